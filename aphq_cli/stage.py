"""The stage skeleton: what every stage does before its own work and after it, written once.

A stage declares a :class:`StageSpec` (its name and settings class); its
function calls :func:`open_stage`, which runs the prologue every stage shares:

1. the ``--quant-config`` section is read, and the values given there and
   on the command line are checked (types and ranges) before anything is opened;
2. the model source is opened and the settings object is resolved, once
   (defaults < model ``aphq_defaults`` < ``--quant-config`` < command line);
3. the stage's images are chosen, the run folder is prepared (and its writer
   lock taken, inside a :func:`~aphq_cli.runs.writes_run` stage) and checked
   against the model, checkpoint and data;
4. the inputs' fingerprints (checkpoint, images, settings, the upstream
   artifacts) are gathered into the one cache key of the stage and its parts.

:attr:`StageRun.current` is the rerun decision (DVC's ``Stage.changed()``),
:meth:`StageRun.save` the atomic write of the artifact with that key; every
stage returns a :class:`StageResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from aphq_cli.artifacts import is_current, save_artifact, sha256_json
from aphq_cli.quantconfig import stage_settings
from aphq_cli.runs import ModelSource, prepare_run, stage_path
from aphq_cli.settings import resolve_settings, settings_from_dict, settings_record


class StageResult(NamedTuple):
    """What every stage returns: its artifact, and whether it was current already (nothing recomputed)."""

    path: Path
    reused: bool


@dataclass(frozen=True)
class StageSpec:
    """What a stage declares about itself.

    Attributes:
        name: the stage (``mlp-recon``); its artifact is ``RUN/<name>.safetensors``.
        settings: its typed settings class, or None for a stage without settings (export).
    """

    name: str
    settings: type | None = None


@dataclass
class StageRun:
    """One invocation of a stage after the prologue.

    Attributes:
        out: the artifact this invocation writes.
        inputs: fingerprints of everything the result depends on: the cache key
            of the artifact and of every part (block, unit) written on the way.
        model: the model name artifacts record in their ``extra``.
        source, config, dataset, quant_config: the model source, the resolved
            settings, the stage's images and the ``--quant-config`` label
            (None/"" for a stage without them).
    """

    spec: StageSpec
    out: Path
    inputs: dict[str, str]
    model: str
    force: bool = False
    source: ModelSource | None = None
    config: Any = None
    dataset: Any = None
    quant_config: str = ""
    run: Path | None = field(default=None)

    @property
    def current(self) -> bool:
        """The artifact is there, intact, and made from exactly these inputs (and ``force`` is off)."""
        return not self.force and is_current(self.out, stage=self.spec.name, inputs=self.inputs)

    @property
    def cache_key(self) -> str:
        """The key of the stage's working caches: their entries follow from exactly these inputs."""
        return sha256_json(self.inputs)

    def reused(self) -> StageResult:
        return StageResult(self.out, True)

    def header(self) -> dict:
        """What every stage artifact of a run records about where it came from (model, data, images)."""
        return self.source.header(self.dataset, self.config.calib_split)

    def save(self, tensors: dict, config: dict) -> StageResult:
        """Write the artifact atomically with this invocation's inputs as its cache key."""
        save_artifact(self.out, tensors, stage=self.spec.name, config=config, inputs=self.inputs,
                      extra={"model": self.model})
        return StageResult(self.out, False)


def open_stage(spec: StageSpec, *, run: Path, source: Callable[[], ModelSource], overrides: dict,
               quant_config: str | Path | None, images: Callable[[ModelSource, Any], Any],
               upstream: Callable[[], dict[str, str]] | None = None, force: bool = False,
               check: Callable[[ModelSource, Any], None] | None = None) -> StageRun:
    """The prologue every stage with settings shares (see the module docstring).

    Args:
        source: opens the model source (after the settings' types are checked).
        overrides: settings from the command line (None values: not given).
        images: ``(source, settings) -> dataset`` of the stage's images.
        upstream: returns the fingerprints of the earlier artifacts this stage
            starts from (``{"calibrate": ...}``), part of the cache key; called
            once the run folder is this process's.
        check: ``(source, settings)``, raises if the settings cannot fit the
            model; called before the run folder is made or touched.
    """
    label, file_values = stage_settings(quant_config, spec.name)
    # Fail fast, before anything is opened (the model's defaults may take a dataset's generation, and
    # reconstruct's source needs the calibrate artifact): every type and range of the values given.
    settings_from_dict(spec.settings, file_values | overrides, spec.name)
    opened = source()
    config = resolve_settings(spec.settings, opened.cfg, spec.name, overrides, file_values)
    if check is not None:
        check(opened, config)
    dataset = images(opened, config)
    out = stage_path(prepare_run(run), spec.name)
    opened.check_run(run)
    inputs = opened.fingerprints(dataset) | {"options": sha256_json(settings_record(config))} | (
        upstream() if upstream else {})
    return StageRun(spec, out, inputs, opened.spec.name, force, opened, config, dataset, label, Path(run))
