"""aphq inspect's display of a quantization map."""

from aphq_cli.inspect import map_summary


def test_the_map_summary_counts_each_bit_width_and_names_the_rare_ones():
    qmap = {f"fc{i}": {"kind": "linear", "w_bits": 4, "a_bits": 4} for i in range(5)}
    qmap["embed"] = {"kind": "conv", "w_bits": 4, "a_bits": 8}
    qmap |= {f"mm{i}": {"kind": "matmul", "w_bits": 0, "a_bits": 4, "heads": 2} for i in range(4)}
    assert map_summary(qmap).splitlines() == ["5 layers W4A4", "4 matmuls A4", "1 layers W4A8 (embed)"]


def test_the_map_summary_shows_grouped_weights_apart():
    qmap = {f"fc{i}": {"kind": "linear", "w_bits": 4, "a_bits": 4} for i in range(4)}
    qmap |= {"head.a": {"kind": "linear", "w_bits": 4, "a_bits": 4, "w_group": 32},
             "head.b": {"kind": "conv", "w_bits": 4, "a_bits": 4, "w_group": 32}}
    assert map_summary(qmap).splitlines() == ["4 layers W4A4", "2 layers W4A4 g32 (head.a, head.b)"]
