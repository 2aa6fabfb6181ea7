"""The ``aphq`` command: thin Typer commands over the stage functions.

Each command parses options, calls one plain function with keyword arguments
and prints what it produced. Failures caused by input end with one sentence on
stderr and a non-zero exit; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import typer

from aphq_cli.allocator import retain_freed_memory
from aphq_cli.errors import AphqError

app = typer.Typer(
    name="aphq",
    help="Post-training quantization of Swin Mask R-CNN / Cascade Mask R-CNN detectors with APHQ-ViT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: the synthetic testbed.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_state = {"verbose": False}


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks and tool logs.")) -> None:
    _state["verbose"] = verbose
    retain_freed_memory()  # every command: its loops reuse freed memory instead of faulting in fresh pages


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's stop), handled as Ctrl-C is: finished work is kept."""


def _terminate(signum, frame) -> None:
    raise Terminated()


# Exit codes, the same for every command (README, "Exit codes").
EXIT_USER_ERROR = AphqError.exit_code  # 2, as for a usage error
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT
EXIT_TERMINATED = 143  # SIGTERM: 128 + SIGTERM


def user_errors(fn: Callable) -> Callable:
    """Turn :class:`AphqError`, Ctrl-C and SIGTERM into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from rich.markup import escape

        from aphq_cli.console import err

        try:
            return fn(*args, **kwargs)
        except AphqError as exc:
            if _state["verbose"]:
                err.print_exception()
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt as stop:
            how = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
            err.print(f"[bold red]interrupted:[/] stopped by {how}; finished work was kept", soft_wrap=True)
            raise typer.Exit(EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED)

    return wrapper


def run_stage(stage_fn: Callable, label: str | None = None, **kwargs) -> None:
    """Run a stage function with progress bars, say when it was a cache hit, print its artifact path.

    Args:
        label: a one-bar stage (progress ``(done, total)``) gets this label;
            multi-phase stages (progress ``(description, done, total)``) pass None.
    """
    from aphq_cli.console import err, stage_progress

    with stage_progress(prefix="" if label else f"{stage_fn.__name__.replace('_', '-')}: ") as report:
        progress = (lambda done, total: report(label, done, total)) if label else report
        path, hit = stage_fn(progress=progress, **kwargs)
    if hit:
        err.print(f"{path} is current (same inputs and options); --force recomputes it")
    fewer = fewer_images(path)
    if fewer:
        err.print(f"note: {fewer}", highlight=False, soft_wrap=True)
    print(path)


def fewer_images(path: Path) -> str | None:
    """A sentence when a stage artifact was made from fewer images than its settings asked for, else None.

    A split with fewer images than ``--images`` is not an error (a small dataset still calibrates), but
    a user who asked for 256 and got 2 must hear of it: the stages take what the split has.
    """
    from aphq_cli import distributed
    from aphq_cli.artifacts import read_header
    from aphq_cli.errors import AphqError

    if not distributed.is_main():  # the other ranks of a torchrun may return before rank 0 writes it
        return None
    try:
        header = read_header(path)
    except AphqError:  # a note never fails a stage that succeeded
        return None
    config = header.config
    section = config.get(header.stage.replace("-", "_"))
    asked = section.get("images") if isinstance(section, dict) else None
    used = len(config.get("image_ids") or [])
    if not isinstance(asked, int) or used >= asked:
        return None
    return (f"{path.name} was made from {used} image(s), not the {asked} asked for: the "
            f"{config.get('calib_split', 'train')} split has no more")


ModelOpt = typer.Option("tiny-mask-rcnn", "--model", "-m",
                        help="Built-in model name (see `aphq models`) or mmdetection config path.")
CheckpointOpt = typer.Option(None, "--checkpoint", "-c",
                             help="Weights (.pth or .safetensors, either Swin layout). "
                                  "Default: a testbed model's bundled weights.")
DataOpt = typer.Option(None, "--data", "-d", help="COCO-layout data folder (annotations/ and image folders).")
DeviceOpt = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.")
QuantConfigOpt = typer.Option(None, "--quant-config", "-q",
                              help="TOML/YAML file of stage settings, or a preset name (4bit: the paper's "
                                   "published configuration; 4bit-heads, 4bit-quarter: docs/quant-config.md). "
                                   "Options given here override single keys.")
CalibSplitOpt = typer.Option(
    None, "--calib-split",
    help="Where calibration/reconstruction images come from: train (default: the training split) or val "
         "(the published protocol: the first annotated images of the evaluation split).")
TrustConfigOpt = typer.Option(False, "--trust-config",
                              help="Read the model config file a run's artifact names. Only for files you "
                                   "trust: an mmdetection config is Python and reading it runs it.")
TrustOpt = typer.Option(False, "--trust-checkpoint",
                        help="Load a pickled checkpoint that torch.load(weights_only=True) refuses. "
                             "Only for files you trust: unpickling can run code.")


@app.command("eval")
@user_errors
def eval_cmd(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Built-in model name (see `aphq models`) or mmdetection config path "
                                    "(default tiny-mask-rcnn). With --run: the model the run was made with."),
    checkpoint: Optional[Path] = CheckpointOpt,
    data: Optional[Path] = DataOpt,
    run: Optional[Path] = typer.Option(None, "--run", "-r",
                                       help="Evaluate a stage of this run folder (its newest by default)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Which stage of --run: mlp-recon, calibrate or reconstruct."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", "-a", help="Evaluate an `aphq export` file."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Evaluate only the first N images."),
    keep_float: Optional[list[str]] = typer.Option(
        None, "--keep-float", metavar="PART[:w|:a]",
        help="Run this part of a quantized model in float (e.g. roi_head, backbone:w); repeatable. "
             "Reconstructed weights take their calibrated float values back (an export's cannot: use PART:a). "
             "Shows where quantization costs accuracy; not recorded in the run."),
    per_class: bool = typer.Option(False, "--per-class", help="Also show (and write to --json) each class's AP."),
    device: str = DeviceOpt,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the metrics (percent) as JSON."),
    trust_checkpoint: bool = TrustOpt,
    trust_config: bool = TrustConfigOpt,
) -> None:
    """COCO box and mask AP of a float detector (--model) or of a stage of a run (--run)."""
    from aphq_cli.console import class_table, err, metrics_table, progress_bar
    from stages.eval import evaluate

    with progress_bar("eval") as update:
        result = evaluate(model=model, checkpoint=checkpoint, data=data, run=run, stage=stage, artifact=artifact,
                          limit=limit, keep_float=keep_float, per_class=per_class,
                          device=device, trust_checkpoint=trust_checkpoint, json_path=json_path,
                          trust_config=trust_config, progress=update)
    if _state["verbose"]:
        err.print(result.log)
    if result.note:
        err.print(f"note: {result.note}", highlight=False, soft_wrap=True)
    if result.per_class is not None:
        err.print(class_table("AP per class", result.per_class))
    err.print(metrics_table(f"{result.model} on {result.images} image(s), {result.seconds:.1f} s",
                            {result.model: result.metrics}))
    if json_path is not None:
        print(json_path)


@app.command("calibrate")
@user_errors
def calibrate_cmd(
    model: str = ModelOpt,
    run: Path = typer.Option(..., "--run", "-r", help="Run folder; writes RUN/calibrate.safetensors."),
    w_bits: Optional[int] = typer.Option(None, "--w-bits", help="Weight bits, 2-8 (default 4)."),
    a_bits: Optional[int] = typer.Option(None, "--a-bits", help="Activation bits, 2-8 (default 4)."),
    calib_images: Optional[int] = typer.Option(
        None, "--calib-images", help="First N training images (default: 1, as the paper; testbed: its config)."),
    image_list: Optional[Path] = typer.Option(
        None, "--image-list", help="Text file of training image ids to calibrate on instead, one per line."),
    calib_split: Optional[str] = CalibSplitOpt,
    head_w_group: Optional[int] = typer.Option(
        None, "--head-w-group", metavar="N",
        help="The RPN and RoI heads' weights get a scale and zero point per N inputs instead of per output "
             "channel (beyond the paper; default 0: per channel, as published). N must divide each head "
             "layer's inputs (32 does for the built-in models)."),
    checkpoint: Optional[Path] = CheckpointOpt,
    data: Optional[Path] = DataOpt,
    device: str = DeviceOpt,
    force: bool = typer.Option(False, "--force", help="Recompute even if the artifact is current."),
    quant_config: Optional[str] = QuantConfigOpt,
    trust_checkpoint: bool = TrustOpt,
) -> None:
    """Quantize every Linear, Conv2d and attention matmul with searched scales."""
    from stages.calibrate import calibrate

    run_stage(calibrate, "calibrate: layers", model=model, run=run, w_bits=w_bits, a_bits=a_bits,
              calib_images=calib_images, image_list=image_list, calib_split=calib_split, checkpoint=checkpoint,
              data=data, device=device, force=force, trust_checkpoint=trust_checkpoint, quant_config=quant_config,
              settings=None if head_w_group is None else {"head_w_group": head_w_group})


@app.command("mlp-recon")
@user_errors
def mlp_recon_cmd(
    model: str = ModelOpt,
    run: Path = typer.Option(..., "--run", "-r", help="Run folder; writes RUN/mlp_recon.safetensors."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Adam steps per block (default 20000; testbed: its config)."),
    images: Optional[int] = typer.Option(None, "--images", help="Reconstruction images (default 256; testbed: its config)."),
    calib_split: Optional[str] = CalibSplitOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    data: Optional[Path] = DataOpt,
    device: str = DeviceOpt,
    force: bool = typer.Option(False, "--force", help="Recompute every block even if finished."),
    keep_cache: bool = typer.Option(
        False, "--keep-cache",
        help="Keep RUN/mlp_recon/cache (each block's float MLP inputs and outputs; by default each "
             "block's go once it is trained) after the stage ends."),
    quant_config: Optional[str] = QuantConfigOpt,
    trust_checkpoint: bool = TrustOpt,
) -> None:
    """Replace GELU with ReLU in every Swin MLP and reconstruct fc1/fc2 block by block (resumable)."""
    from stages.mlp_recon import mlp_recon

    run_stage(mlp_recon, model=model, run=run, iters=iters, images=images, calib_split=calib_split,
              checkpoint=checkpoint, data=data, device=device, force=force, trust_checkpoint=trust_checkpoint,
              quant_config=quant_config, keep_cache=keep_cache)


@app.command("reconstruct")
@user_errors
def reconstruct_cmd(
    run: Path = typer.Option(..., "--run", "-r", help="Run folder holding calibrate.safetensors."),
    loss: Optional[str] = typer.Option(None, "--loss", help="aph (default), mse, fisher or none."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Iterations per unit (default 20000; testbed: its config)."),
    images: Optional[int] = typer.Option(None, "--images", help="Reconstruction images (default 256; testbed: its config)."),
    calib_split: Optional[str] = CalibSplitOpt,
    heads: bool = typer.Option(False, "--heads",
                               help="Also reconstruct the RPN, box and mask heads after the FPN (beyond the paper)."),
    device: str = DeviceOpt,
    force: bool = typer.Option(False, "--force", help="Recompute every unit even if finished."),
    keep_aph_cache: bool = typer.Option(
        False, "--keep-aph-cache/--drop-aph-cache",
        help="Keep this run's APH weights in the shared cache ($APHQ_CACHE/aph) for later runs on the same "
             "checkpoint and images. By default they are removed, each unit's once it is done (no later stage "
             "reads them), unless another run is using them."),
    quant_config: Optional[str] = QuantConfigOpt,
    trust_checkpoint: bool = TrustOpt,
    trust_config: bool = TrustConfigOpt,
) -> None:
    """Block-wise AdaRound reconstruction with APH weights (resumable per unit)."""
    from stages.reconstruct import reconstruct

    run_stage(reconstruct, run=run, loss=loss, iters=iters, images=images, calib_split=calib_split,
              heads=True if heads else None, device=device, force=force, trust_checkpoint=trust_checkpoint,
              quant_config=quant_config, trust_config=trust_config, keep_aph_cache=keep_aph_cache)


@app.command("export")
@user_errors
def export_cmd(
    run: Path = typer.Option(..., "--run", "-r", help="Run folder holding a quantized stage."),
    out: Path = typer.Option(..., "--out", "-o", help="The export file to write (.safetensors)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Which stage (default: the newest)."),
    trust_checkpoint: bool = TrustOpt,
    trust_config: bool = TrustConfigOpt,
) -> None:
    """Packed integer weights and every quantizer, reloadable with `aphq eval --artifact`."""
    from aphq_cli.console import err
    from aphq_cli.runs import newest_stage, read_stage
    from stages.export import export

    path = export(run=run, out=out, stage=stage, trust_checkpoint=trust_checkpoint, trust_config=trust_config).path
    ckpt = Path(read_stage(run, stage or newest_stage(run))[1].checkpoint)
    size, fp = path.stat().st_size, ckpt.stat().st_size
    err.print(f"export {size / 2**20:.2f} MiB; float checkpoint {ckpt.name} {fp / 2**20:.2f} MiB "
              f"({fp / size:.1f}x larger)")
    print(path)


@app.command("demo")
@user_errors
def demo_cmd(
    model: str = typer.Option("tiny-mask-rcnn", "--model", "-m", help="A testbed model."),
    run: Path = typer.Option(Path("runs/demo"), "--run", "-r", help="Run folder for the stage artifacts."),
    w_bits: Optional[int] = typer.Option(None, "--w-bits", help="Weight bits, 2-8 (default 4)."),
    a_bits: Optional[int] = typer.Option(None, "--a-bits", help="Activation bits, 2-8 (default 4)."),
    limit: int = typer.Option(100, "--limit", "-n",
                              help="Evaluate on the first N val images (default 100 of 200: five evaluations "
                                   "of all 200 would take most of the demo's time on two cores)."),
    device: str = DeviceOpt,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the table as JSON."),
) -> None:
    """The whole chain on the synthetic testbed, with no download: AP and time per stage."""
    from aphq_cli.demo import print_demo, run_demo

    rows = run_demo(model=model, run=run, w_bits=w_bits, a_bits=a_bits, limit=limit, device=device,
                    json_path=json_path)
    print_demo(rows, f"aphq demo: {model}, run folder {run}")  # the calibrate row names the bits
    print(run)


@app.command("status")
@user_errors
def status_cmd(run: Path = typer.Option(..., "--run", "-r", help="Run folder."),
               json_out: bool = typer.Option(False, "--json", help="Print the stages as JSON on stdout, for scripts."),
               trust_config: bool = TrustConfigOpt) -> None:
    """Which stages a run holds, what made them, whether each is current, and a running stage's progress."""
    import json

    from rich.table import Table

    from aphq_cli.console import err
    from aphq_cli.inspect import run_status

    stages = run_status(run, trust_config=trust_config)
    if json_out:
        print(json.dumps({"run": str(run), "stages": [s.to_json() for s in stages]}, indent=1))
        return
    colours = {"stale": "red", "damaged": "red", "stopped": "yellow", "running": "green"}
    table = Table(title=f"run {run}")
    for col in ("stage", "state", "made", "from"):
        table.add_column(col)
    for s in stages:
        state = f"[{colours[s.state]}]{s.state}[/]" if s.state in colours else s.state
        table.add_row(s.stage, state, s.created, s.detail)
    err.print(table)


@app.command("report")
@user_errors
def report_cmd(
    run: Path = typer.Option(..., "--run", "-r", help="Run folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default RUN/report.png)."),
) -> None:
    """A PNG of a run: reconstruction loss per block and box/mask AP per evaluated stage."""
    from aphq_cli.console import err
    from aphq_cli.report import write_report

    path, report = write_report(run, out)
    if report.stale:
        err.print(f"left out stale evaluations (weights changed since): {', '.join(report.stale)}")
    print(path)


@app.command("inspect")
@user_errors
def inspect_cmd(path: Path = typer.Argument(..., help="An artifact or any safetensors file.")) -> None:
    """The header and a summary of every tensor of an artifact."""
    from rich.table import Table

    from aphq_cli.console import err
    from aphq_cli.inspect import header_fields, tensor_rows

    head = Table(title=str(path), show_header=False)
    for key, value in header_fields(path).items():
        head.add_row(key, value)
    err.print(head)
    tensors = Table(title="tensors")
    for col in ("name", "dtype", "shape", "min / mean / max"):
        tensors.add_column(col)
    for row in tensor_rows(path):
        tensors.add_row(*row)
    err.print(tensors)


@app.command("models")
@user_errors
def models_cmd() -> None:
    """List the built-in models and whether weights come bundled."""
    from rich.table import Table

    from aphq_cli.console import err
    from aphq_cli.models.zoo import builtin_models

    table = Table(title="built-in models")
    table.add_column("name")
    table.add_column("weights")
    for spec in builtin_models().values():
        table.add_row(spec.name, "bundled" if spec.weights else "--checkpoint PATH")
    err.print(table)


@data_app.command("synth")
@user_errors
def synth_cmd(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder to write; default: the cache."),
    seed: int = typer.Option(0, help="Generator seed: the same seed gives the same bytes."),
) -> None:
    """Generate the synthetic COCO-layout testbed dataset."""
    from aphq_cli.console import progress_bar
    from aphq_cli.data.synth import SynthSpec, ensure_dataset, generate

    spec = SynthSpec(seed=seed)
    with progress_bar("synth") as update:
        path = generate(out, spec, progress=update) if out is not None else ensure_dataset(spec, progress=update)
    print(path)


def main() -> None:
    """Console-script entry point."""
    # mmcv/mmdetection announce deprecations users cannot act on, and mmcv's
    # import makes torch log that a CPU machine has no CUDA.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(mmcv|mmdet)\b")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from aphq_cli import distributed

    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # paths and JSON come once, from rank 0
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app(prog_name="aphq")  # click ends with SystemExit, 0 on success
    except SystemExit as done:
        if done.code in (None, 0):
            distributed.close()
        raise
    distributed.close()


if __name__ == "__main__":
    sys.exit(main())
