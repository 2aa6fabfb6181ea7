"""Run folders: where each stage's artifact lives, what a stage starts from, and reloading.

A run folder holds one artifact per stage (``calibrate.safetensors``, ...).
:class:`ModelSource` gathers what every stage starts from (model config,
checkpoint, data) with their fingerprints; :func:`load_stage` rebuilds the
quantized detector of a stage from its artifact alone, never re-running it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from aphq_cli import distributed, progress
from aphq_cli.artifacts import (atomic_write_bytes, load_artifact, read_header, remove_stale_temps, sha256_file,
                                sha256_json)
from aphq_cli.data.coco import build_dataset, build_loader, calibration_dataset, fingerprint_dataset, to_device
from aphq_cli.data.synth import default_cache_root
from aphq_cli.devices import resolve_device
from aphq_cli.errors import AphqError
from aphq_cli.headers import stage_record
from aphq_cli.models.plan import detector_plan
from aphq_cli.models.surgery import apply_mlp_recon
from aphq_cli.models.zoo import CONFIG_DIR, builtin_models, default_data_dir, load_config, load_model, resolve_model
from aphq_cli.quant.modules import load_quant_state, quant_state
from aphq_cli.quant.wrap import apply_plan, plan_from_map
from aphq_cli.tensorcache import SharedUse, TensorCache

# Bumps when the estimate itself changes, so older cached estimates are not reused.
APH_VERSION = 2  # 2: the box term averages over every element of a level (method.md §4)
STAGES = ("mlp-recon", "calibrate", "reconstruct")  # in pipeline order; later stages build on earlier ones


def prepare_run(run: Path) -> Path:
    """Create the run folder and check it is writable, before any long computation.

    Inside a :func:`writes_run` stage this also takes the folder's writer lock
    for the rest of the stage.
    """
    run = Path(run)
    probe = atomic_write_bytes(run / f".aphq-write-check-{os.getpid()}", b"")  # per process: torchrun ranks
    probe.unlink()
    if _SCOPES:
        scope, stage = _SCOPES[-1]
        scope.enter_context(run_lock(run))
        # The folder is ours now: what killed writers left in it goes (their temp files).
        remove_stale_temps(run, recursive=True)
        if distributed.is_main():  # one progress record per run folder, for `aphq status` in another shell
            scope.enter_context(progress.recording(run, stage))
    return run


def can_write(folder: Path) -> bool:
    """Whether a file can be written into ``folder`` (created if need be), found by writing one.

    A permission bit says nothing for root or on a read-only mount; a write does.
    """
    try:
        probe = atomic_write_bytes(Path(folder) / f".aphq-write-check-{os.getpid()}", b"")
        probe.unlink()
    except (AphqError, OSError):
        return False
    return True


LOCK_NAME = ".aphq.lock"
_HELD: set[Path] = set()  # run folders whose lock this process holds


@contextlib.contextmanager
def run_lock(run: Path) -> Iterator[Path]:
    """Hold the run folder's writer lock for the scope: one writing process per run folder.

    ``flock`` on ``RUN/.aphq.lock``: the OS releases it when the process dies, so
    a killed run never leaves a stale lock. Re-entrant within a process (the
    demo chains stages in one); under torchrun rank 0 holds it for the job.

    Raises:
        AphqError: another process holds it (the sentence names its PID).
    """
    run = Path(run).resolve()
    if run in _HELD or not distributed.is_main():  # held already by this process, or by rank 0 for the job
        yield run
        return
    fd = os.open(run / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise AphqError(f"run folder {run} is being written by process {holder}; wait for it to finish, "
                        "or use another --run folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD.add(run)
    try:
        yield run
    finally:
        _HELD.discard(run)
        os.close(fd)  # closing the descriptor releases the lock


_SCOPES: list[tuple[contextlib.ExitStack, str]] = []  # open @writes_run calls and their stages, innermost last


def writes_run(stage_fn):
    """Decorator: a stage function holds its run folder's lock from its first write on until it returns.

    The lock is taken where the stage calls :func:`prepare_run` (after its
    arguments are checked, so a refused command leaves no folder behind), not
    at the call.
    """
    @functools.wraps(stage_fn)
    def locked(*args, **kwargs):
        with contextlib.ExitStack() as scope:
            _SCOPES.append((scope, stage_fn.__name__.replace("_", "-")))
            try:
                return stage_fn(*args, **kwargs)
            finally:
                _SCOPES.pop()
    return locked


def used_by_the_stage(cache: TensorCache) -> SharedUse:
    """``cache`` in shared use until the running :func:`writes_run` stage returns.

    Outside a stage nothing is held (so nothing leaks); the result's drops still
    leave the cache alone while another process uses it.
    """
    use = SharedUse(cache)
    return _SCOPES[-1][0].enter_context(use) if _SCOPES else use


def stage_path(run: Path, stage: str) -> Path:
    """``run/<stage>.safetensors`` (dashes become underscores)."""
    return Path(run) / f"{stage.replace('-', '_')}.safetensors"


def read_stage(run: Path, stage: str):
    """The header of ``run``'s artifact of ``stage`` and its typed record, checked to be that stage's.

    Returns:
        ``(header, record)``: an :class:`~aphq_cli.artifacts.ArtifactHeader` and
        a :class:`~aphq_cli.headers.StageRecord`.
    """
    path = stage_path(run, stage)
    header = read_header(path)
    return header, stage_record(header, path, expect=stage)


def upstream_changes(run: Path, stage: str, header) -> list[str]:
    """The earlier stages' artifacts that differ from those ``stage``'s artifact was made from.

    Reconstruct records the fingerprint of the calibrate artifact it started
    from, calibrate (after mlp-recon) that of the mlp-recon artifact: when the
    file now there is another (calibrated again with other bits, say), the later
    stage describes a model that no longer follows from the run, so it is stale.
    """
    changed = []
    if stage == "reconstruct":
        calib = stage_path(run, "calibrate")
        if not calib.is_file() or sha256_file(calib) != header.inputs.get("calibrate"):
            changed.append("calibrate artifact")
    mlp = stage_record(header, stage_path(run, stage)).mlp_recon_artifact
    if mlp and (not Path(mlp).is_file() or sha256_file(mlp) != header.inputs.get("mlp_recon")):
        changed.append("mlp-recon artifact")
    return changed


def same_model(named: str, recorded: str) -> bool:
    """Whether a ``--model`` value names the model an artifact records (a built-in name or a config path)."""
    if named in builtin_models() or recorded in builtin_models():
        return named == recorded
    return Path(named).resolve() == Path(recorded).resolve()


def check_recorded_model(model: str, trusted: bool | str | Path | None) -> None:
    """Refuse to read a model config file that an artifact header names, unless the user vouched for it.

    An mmdetection config is Python, and reading it runs it: an artifact (which
    anyone can hand over) must never make aphq execute code. A built-in model
    name resolves to our own configs; a recorded path is read only when the
    user names the same file on the command line (``--model PATH``) or passes
    ``--trust-config``.
    """
    if model in builtin_models() or trusted is True:
        return
    if trusted and str(trusted) not in builtin_models() and Path(trusted).resolve() == Path(model).resolve():
        return
    raise AphqError(f"the artifact names model config {model}, and reading a config file runs its Python code; "
                    f"pass --model {model} or --trust-config if you trust that file")


def run_owned(run: Path) -> list[Path]:
    """What a run folder keeps for itself: stage artifacts, their block and cache folders, eval records."""
    run = Path(run).resolve()
    return [stage_path(run, s) for s in STAGES] + [run / folder for folder in ("mlp_recon", "reconstruct", "eval")]


def check_output(out: Path, what: str, *, inputs=(), runs=(), replaces: str | None = None) -> None:
    """Refuse, before any work, an output path that would overwrite what the command reads or a run keeps.

    Args:
        out: the path the command will write.
        what: how the command line names it (``--out``, ``--json``).
        inputs: the files the command reads (None entries are skipped).
        runs: run folders whose own files (:func:`run_owned`) ``out`` may not replace.
        replaces: the one artifact stage ``out`` may already hold (``export`` for an export); any
            other aphq artifact there is refused (a JSON or PNG never replaces one).
    """
    out = Path(out)
    target = out.resolve()
    for path in (Path(p) for p in inputs if p is not None):
        same = target == path.resolve() or (out.exists() and path.exists() and os.path.samefile(out, path))
        if same:
            raise AphqError(f"{what} {out} is one of this command's inputs ({path}); choose another path")
    for run in (r for r in runs if r is not None):
        for owned in run_owned(run):
            if target == owned or owned in target.parents:
                raise AphqError(f"{what} {out} would overwrite {owned.name} of run folder {Path(run)}; "
                                "choose a path outside the run's own files")
    if out.is_file():
        try:
            header = read_header(out)
        except AphqError:
            return
        if header.stage == replaces:
            return
        raise AphqError(f"{what} {out} is an aphq {header.stage} artifact; choose another path, or delete it first")


@dataclass
class ModelSource:
    """The inputs a stage starts from.

    Attributes:
        spec: the model (built-in or config file).
        cfg: its parsed mmdetection config.
        checkpoint: the weights file.
        data: the COCO-layout folder, or None for the config's own data_root.
    """

    spec: object
    cfg: object
    checkpoint: Path
    data: Path | None
    trust_checkpoint: bool = False

    @classmethod
    def open(cls, model: str, checkpoint: Path | None, data: Path | None, *,
             trust_checkpoint: bool = False) -> "ModelSource":
        spec = resolve_model(model)
        if checkpoint is None:
            if spec.weights is None:
                raise AphqError(f"model {spec.name} has no bundled weights; pass --checkpoint PATH")
            checkpoint = spec.weights
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise AphqError(f"checkpoint {checkpoint} does not exist")
        cfg = load_config(spec)
        if data is None:
            data = default_data_dir(cfg)
        return cls(spec, cfg, checkpoint.resolve(), Path(data).resolve() if data else None, trust_checkpoint)

    def dataset(self, split: str, limit: int | None = None, image_ids=None):
        return build_dataset(self.cfg, split, self.data, limit=limit, image_ids=image_ids)

    def calibration_dataset(self, protocol: str, limit: int | None = None, image_ids=None):
        """Calibration or reconstruction images: ``train`` (default) or the published ``val`` protocol."""
        return calibration_dataset(self.cfg, protocol, self.data, limit=limit, image_ids=image_ids)

    def fingerprints(self, dataset) -> dict[str, str]:
        return {"checkpoint": sha256_file(self.checkpoint), "data": fingerprint_dataset(dataset)}

    @property
    def model_id(self) -> str:
        """How artifacts name the model: a built-in name, or the config file's absolute path."""
        builtin = Path(self.spec.config).parent == CONFIG_DIR
        return self.spec.name if builtin else str(Path(self.spec.config).resolve())

    def header(self, dataset, calib_split: str = "train") -> dict:
        """What an artifact records so that :func:`load_stage` can rebuild the model.

        ``calib_split`` is the protocol the stage's images came from, so a
        result says whether it used the published val-split images.
        """
        return {"model": self.model_id, "checkpoint": str(self.checkpoint), "data": str(self.data or ""),
                "image_ids": [int(i) for i in dataset.img_ids], "calib_split": calib_split}

    def check_run(self, run: Path) -> None:
        """Refuse a run folder whose artifacts were made from another model, checkpoint or data.

        A run folder is one pipeline: a stage built on artifacts of another
        model or checkpoint would be wrong, and replacing them would silently
        orphan the stages built on them. Damaged artifacts are reported too.
        """
        mine = {"model": self.model_id, "data": str(self.data or "")}
        checkpoint = None
        for stage in STAGES:
            path = stage_path(run, stage)
            if not path.is_file():
                continue
            header, made = read_stage(run, stage)
            for key, value in mine.items():
                if getattr(made, key) != value:
                    raise AphqError(f"{path} was made from {key} {getattr(made, key) or '(config default)'}, "
                                    f"not {value or '(config default)'}; use another --run folder")
            checkpoint = checkpoint or sha256_file(self.checkpoint)
            if header.inputs.get("checkpoint") != checkpoint:
                raise AphqError(f"{path} was made from another checkpoint than {self.checkpoint}; "
                                "use another --run folder")

    def build(self, device, mlp_recon: Path | None = None) -> torch.nn.Module:
        """The float detector with its checkpoint loaded, on ``device``.

        Args:
            mlp_recon: an mlp-recon artifact to apply (ReLU MLPs with their
                reconstructed weights).
        """
        detector, _, _ = load_model(self.spec, self.checkpoint, trust_pickle=self.trust_checkpoint,
                                    device=resolve_device(str(device)), cfg=self.cfg)
        if mlp_recon is not None:
            apply_mlp_recon(detector, load_artifact(mlp_recon, stage="mlp-recon", device=device)[0])
        return detector

    def images(self, dataset, device) -> "ImageSequence":
        """The model input tensor of each image, loaded on access (memory holds one at a time)."""
        return ImageSequence(dataset, device)

    def batches(self, dataset, device) -> Iterator[dict]:
        """Model inputs for each image of ``dataset`` on ``device``, in order."""
        for batch in build_loader(dataset):
            yield to_device(batch, device)


class ImageSequence:
    """``seq[i]`` is image i of a dataset through its test pipeline, as a ``(1, 3, H, W)`` tensor."""

    def __init__(self, dataset, device) -> None:
        self.dataset, self.device = dataset, device
        self._metas: dict[int, dict] = {}

    def meta(self, index: int) -> dict:
        """Image i's meta as the model's test pass takes it (``img_shape``, ``scale_factor``, ...)."""
        if index not in self._metas:
            self._metas[index] = self.dataset[index]["img_metas"][0].data
        return self._metas[index]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.dataset[index]["img"][0].unsqueeze(0).to(self.device)


def aph_cache(source: ModelSource, dataset, delta: float, dtype: torch.dtype = torch.float16):
    """The shared APH cache of (checkpoint, images, delta): original float-model estimates.

    mlp-recon and reconstruct both weigh by the APH of the original (GELU)
    model, so one estimate serves every run on the same images. Stored in
    float16 (half the disk); another ``dtype`` is another entry.
    """
    stored = {} if dtype == torch.float16 else {"dtype": str(dtype)}  # float16 entries keep their folder
    key = sha256_json(source.fingerprints(dataset) | {"delta": delta, "aph": APH_VERSION} | stored)[:16]
    return TensorCache(default_cache_root() / "aph" / key, dtype=dtype)


def newest_stage(run: Path) -> str:
    """The latest pipeline stage whose artifact exists in ``run``."""
    if not Path(run).is_dir():
        raise AphqError(f"run folder {run} does not exist")
    for stage in reversed(STAGES):
        if stage_path(run, stage).is_file():
            return stage
    raise AphqError(f"run folder {run} holds no stage artifact yet (run `aphq calibrate --run {run}` first)")


def apply_params(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy stored parameters into ``model``; a bias the float model lacked is created."""
    state = model.state_dict()
    for name, value in params.items():
        if name in state:
            state[name].copy_(value)
            continue
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if getattr(module, attr, "absent") is not None:
            raise AphqError(f"artifact tensor {name} has no place in this model")
        setattr(module, attr, torch.nn.Parameter(value.clone().to(next(model.parameters()).device)))


def quantized_tensors(detector, params_before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Quantizer state plus every parameter that differs from the float model's."""
    quant = quant_state(detector)
    tensors = {f"quant:{k}": v for k, v in quant.items()}
    for name, value in detector.state_dict().items():
        if name in quant:
            continue
        if name not in params_before or not torch.equal(params_before[name], value):
            tensors[f"param:{name}"] = value.detach().clone()
    return tensors


def apply_saved_plan(detector: torch.nn.Module, record, path: Path) -> None:
    """Quantize ``detector`` by the plan an artifact's record (stage or export) holds in its ``quantization_map``.

    The map is checked against the model: its layers, and each layer's bits
    and weight groups as the quantized layers are built. An artifact written
    before the map was recorded (it has none) gets the model's plan at its
    ``w_bits``/``a_bits``, which is what those versions built.
    """
    plan = detector_plan(detector, record.w_bits, record.a_bits)
    try:
        if record.quantization_map is not None:
            plan = plan_from_map(record.quantization_map, set(plan.layers))
        apply_plan(detector, plan)
    except ValueError as err:
        raise AphqError(f"{path} cannot be rebuilt: {err}; rerun the stage that wrote it") from err


def recorded_source(path: Path, header, *, trust_checkpoint: bool = False,
                    trust_config: bool | str | Path | None = None) -> ModelSource:
    """The model source a stage artifact's header records, checked before anything is built from it.

    Its model config is read only as :func:`check_recorded_model` allows, and
    its checkpoint must still have the fingerprint it had when the stage ran.
    """
    made = stage_record(header, path, expect=header.stage)
    check_recorded_model(made.model, trust_config)
    source = ModelSource.open(made.model, Path(made.checkpoint), Path(made.data) if made.data else None,
                              trust_checkpoint=trust_checkpoint)
    if sha256_file(source.checkpoint) != header.inputs["checkpoint"]:
        raise AphqError(f"checkpoint {source.checkpoint} changed since {path} was made; rerun the stage")
    return source


def check_fresh(run: Path, stage: str, header) -> None:
    """Refuse a stage artifact whose upstream artifacts changed since it was made (:func:`upstream_changes`)."""
    stale = upstream_changes(run, stage, header)
    if stale:
        earlier = "calibrate" if "calibrate artifact" in stale else "mlp-recon"
        raise AphqError(f"{stage_path(run, stage)} is stale: the {' and '.join(stale)} it was made from changed or "
                        f"is gone; rerun `aphq {stage} --run {run}`, or name an earlier stage with --stage {earlier}")


def load_stage(run: Path, stage: str | None = None, device="cpu", *, trust_checkpoint: bool = False,
               trust_config: bool | str | Path | None = None):
    """Rebuild the quantized detector a stage's artifact describes.

    The checkpoint recorded in the artifact must still have the fingerprint
    it had when the stage ran.

    Args:
        trust_config: a model config path the user named, or True: see
            :func:`check_recorded_model` (built-in models need nothing).

    Returns:
        ``(detector, source, header)``.
    """
    stage = stage or newest_stage(run)
    if stage not in STAGES:
        raise AphqError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    path = stage_path(run, stage)
    source = recorded_source(path, read_stage(run, stage)[0], trust_checkpoint=trust_checkpoint,
                             trust_config=trust_config)
    tensors, header = load_artifact(path, stage=stage)
    if stage == "mlp-recon":
        return source.build(device, mlp_recon=path), source, header
    check_fresh(run, stage, header)
    made = stage_record(header, path)
    mlp = made.mlp_recon_artifact
    detector = source.build(device, mlp_recon=Path(mlp) if mlp else None)
    apply_saved_plan(detector, made, path)
    apply_params(detector, {k[len("param:"):]: v for k, v in tensors.items() if k.startswith("param:")})
    try:
        load_quant_state(detector, {k[len("quant:"):]: v for k, v in tensors.items() if k.startswith("quant:")})
    except KeyError as err:
        raise AphqError(f"{path} does not match model {made.model}: no quantizer state for {err}") from err
    return detector.to(device), source, header
