"""The ``tigbev`` command line: each command parses its options, builds a config and calls one stage."""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from tigbev.bench.config import BenchConfig as _BenchConfig
from tigbev.config import (
    EvaluateConfig,
    ExtractTeacherConfig,
    LossWeights,
    PretrainBackboneConfig,
    SynthConfig,
    TrainStudentConfig,
)
from tigbev.errors import TigbevError, worker_error
from tigbev.pipeline.ablate import BDA_ROWS as _BDA_ROWS
from tigbev.pipeline.ablate import AblateConfig as _AblateConfig
from tigbev.pipeline.demo import DemoConfig as _DemoConfig

app = typer.Typer(
    name="tigbev",
    help="TiG-BEV LiDAR-to-camera distillation with an offline teacher cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


_F = TypeVar("_F", bound=Callable[..., Any])


def _default(cls: type, name: str) -> Any:
    """A configuration field's default, for an option's help: the configuration is the one home of defaults."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave: None means not given, so the configuration's default applies."""
    return {k: v for k, v in options.items() if v is not None}


def _image_hw(text: str | None) -> tuple[int, int] | None:
    """``--input-hw HxW`` (e.g. 192x528) as (H, W); refused, naming the option, unless two positive integers."""
    if text is None:
        return None
    h, sep, w = text.lower().partition("x")
    if not (sep and h.strip().isdigit() and w.strip().isdigit()):
        raise TigbevError(f"--input-hw must be HxW in pixels, e.g. 192x528, got {text!r}")
    return int(h), int(w)


_DEBUG_ENV = "TIGBEV_DEBUG"
_debug = {"on": False}
"""This invocation's --debug (set by the root callback on every invocation)."""


@app.callback()
def _root(debug: Annotated[bool, typer.Option(
        "--debug", help=f"Show the full traceback of a failure (or set {_DEBUG_ENV}=1).")] = False) -> None:
    """TiG-BEV LiDAR-to-camera distillation with an offline teacher cache."""
    _debug["on"] = debug


def _message(exc: BaseException) -> str:
    """One line that says what failed, naming the file, option or sample (the errors' own messages do); an error
    raised in a DataLoader worker reads as it would in this process (not as torch's re-raise of its traceback)."""
    original = worker_error(exc)
    if original is not None:
        exc = original
    if isinstance(exc, (TigbevError, ValueError)):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    elif isinstance(exc, EOFError):
        text = f"a file ended early ({exc or 'EOF'})"
    elif isinstance(exc, pickle.UnpicklingError):
        from tigbev.checkpoint_file import unpickler_reason

        text = f"refused to unpickle a file: {unpickler_reason(exc)}"
    else:
        text = f"{type(exc).__name__}: {exc} (an internal error; rerun with --debug and report the traceback)"
    return " ".join(text.split())


def _fail(exc: BaseException) -> typer.Exit:
    typer.secho(f"error: {_message(exc)}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _passthrough() -> tuple[type[BaseException], ...]:
    """The exceptions typer reports itself: its own, and click's where typer still uses the click package (typer
    0.2x carries its own copy, and click need not be installed)."""
    own = (typer.Exit, typer.Abort, getattr(typer.exceptions, "TyperException", typer.Exit))
    try:
        import click
    except ImportError:
        return own
    return (*own, click.exceptions.Exit, click.exceptions.Abort, click.ClickException)


_PASSTHROUGH = _passthrough()


def _guarded(command: _F) -> _F:
    """Every failure of a command is one line on stderr and exit code 2; --debug (or TIGBEV_DEBUG=1) re-raises."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except _PASSTHROUGH:
            raise
        except BrokenPipeError:  # the reader of the output left (`| head`): what it wanted was written; stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush into the pipe
            raise typer.Exit(code=1) from None
        except Exception as exc:  # noqa: BLE001 - the one place that turns failures into one line
            if _debug["on"] or os.environ.get(_DEBUG_ENV, "") not in ("", "0"):
                raise
            raise _fail(exc) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@_guarded
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Dataroot to create (must not exist, or be empty).")],
    scenes: Annotated[int | None, typer.Option(
        min=1, help=f"Number of scenes (default {_default(SynthConfig, 'scenes')}).")] = None,
    samples_per_scene: Annotated[int | None, typer.Option(min=2, help=(
        f"Key frames per scene, 2 Hz (default {_default(SynthConfig, 'samples_per_scene')})."))] = None,
    val_scenes: Annotated[
        int | None, typer.Option(min=0, help="Scenes in the synth_val split (the last ones); default: a sixth.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help=(
        "Random seed; the output is a deterministic function of it "
        f"(default {_default(SynthConfig, 'seed')})."))] = None,
    image_width: Annotated[int | None, typer.Option(
        help=f"Camera image width, px (default {_default(SynthConfig, 'image_width')}).")] = None,
    image_height: Annotated[int | None, typer.Option(
        help=f"Camera image height, px (default {_default(SynthConfig, 'image_height')}).")] = None,
    sweeps_per_sample: Annotated[int | None, typer.Option(min=0, help=(
        f"Non-key LiDAR sweeps between key frames (default {_default(SynthConfig, 'sweeps_per_sample')})."))] = None,
    lidar_azimuth_steps: Annotated[int | None, typer.Option(help=(
        "LiDAR horizontal resolution, steps per turn "
        f"(default {_default(SynthConfig, 'lidar_azimuth_steps')})."))] = None,
    object_density: Annotated[float | None, typer.Option(help=(
        f"Scales the number of extra objects, >= 0 (default {_default(SynthConfig, 'object_density')})."))] = None,
    workers: Annotated[int | None, typer.Option(min=1, help=(
        f"Processes rendering scenes in parallel (default {_default(SynthConfig, 'workers')})."))] = None,
    render_labels: Annotated[bool, typer.Option(
        "--render-labels/--no-render-labels", help="Write the renderer's per-pixel depth and class (renderer/).")]
    = True,
    label_stride: Annotated[int | None, typer.Option(min=1, help=(
        f"Keep every N-th pixel of the renderer's labels (default {_default(SynthConfig, 'label_stride')})."))
    ] = None,
) -> None:
    """Write a synthetic nuScenes-format dataroot (splits synth_train and synth_val)."""
    from tigbev.data.synth.writer import write_synthetic_dataset

    cfg = SynthConfig(
        out_dir=out_dir, val_scenes=val_scenes, render_labels=render_labels,
        **_given(scenes=scenes, samples_per_scene=samples_per_scene, seed=seed, image_width=image_width,
                 image_height=image_height, sweeps_per_sample=sweeps_per_sample,
                 lidar_azimuth_steps=lidar_azimuth_steps, object_density=object_density, workers=workers,
                 label_stride=label_stride),
    )
    result = write_synthetic_dataset(cfg)
    typer.echo(
        f"wrote {result.num_samples} samples ({result.num_annotations} annotations) to {result.dataroot} "
        f"in {result.seconds:.1f} s; version {result.version}, splits {result.train_split} / {result.val_split}"
    )


@app.command("train-teacher")
@_guarded
def train_teacher(
    preset: Annotated[str, typer.Option(help="Model + defaults: 'demo' (CPU-sized) or 'nuscenes' (published).")],
    dataroot: Annotated[Path, typer.Option(exists=True, file_okay=False, help="nuScenes-format dataroot.")],
    split: Annotated[str, typer.Option(help="Training split (predefined or from splits.json).")],
    out: Annotated[Path, typer.Option(help="Run directory (new, or an existing one with --resume).")],
    val_split: Annotated[str | None, typer.Option(help="Evaluate the final model on this split.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (default: the preset's).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Samples per step (default: the preset's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak one-cycle learning rate (default: preset's).")] = None,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda[:N]'.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt.")] = False,
    no_augment: Annotated[bool, typer.Option(help="Disable rotation/scale/flip augmentation.")] = False,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many steps (smoke runs).")] = None,
    tensorboard: Annotated[bool, typer.Option(help=(
        "Also log to OUT/tensorboard: metrics.jsonl's scalars, the final metrics and a BEV picture "
        "(pip install 'tigbev[tensorboard]')."))] = False,
) -> None:
    """Train the CenterPoint LiDAR teacher; checkpoints, metrics log and loss curve go to OUT."""
    from tigbev.config import TrainTeacherConfig, train_teacher_defaults
    from tigbev.stages import train_teacher as stage

    defaults = train_teacher_defaults(preset)  # type: ignore[arg-type]
    overrides = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items() if v is not None}
    cfg = TrainTeacherConfig(
        preset=preset, dataroot=dataroot, split=split, out_dir=out, val_split=val_split, workers=workers,
        seed=seed, device=device, resume=resume, augment=not no_augment, max_steps=max_steps,
        tensorboard=tensorboard, **{**defaults, **overrides},
    )
    result = stage.run(cfg)
    typer.echo(f"teacher: {result.steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.3f}, "
               f"checkpoint {result.checkpoint}")
    if result.metrics is not None:
        typer.echo(f"{val_split}: mAP {result.metrics['mAP']:.4f}  NDS {result.metrics['NDS']:.4f}")


@app.command("pretrain-backbone")
@_guarded
def pretrain_backbone(
    preset: Annotated[str, typer.Option(help="Student preset whose backbone is pretrained: 'demo' or 'nuscenes'.")],
    dataroot: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Synthetic dataroot (tigbev synth).")],
    split: Annotated[str, typer.Option(help="Training split.")],
    out: Annotated[Path, typer.Option(help="Run directory (new, or an existing one with --resume).")],
    val_split: Annotated[str | None, typer.Option(help="Report per-cell depth and class accuracy on this split.")]
    = None,
    epochs: Annotated[int | None, typer.Option(
        min=1, help=f"Default: {_default(PretrainBackboneConfig, 'epochs')}.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help=(
        f"Camera images per step (default {_default(PretrainBackboneConfig, 'batch_size')})."))] = None,
    lr: Annotated[float | None, typer.Option(help=(
        "Peak one-cycle learning rate, a finite number > 0 "
        f"(default {_default(PretrainBackboneConfig, 'lr')})."))] = None,
    workers: Annotated[int | None, typer.Option(
        min=0, help=f"Default: {_default(PretrainBackboneConfig, 'workers')}.")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Default: {_default(PretrainBackboneConfig, 'seed')}.")] = None,
    device: Annotated[str | None, typer.Option(
        help=f"'auto', 'cpu' or 'cuda[:N]' (default {_default(PretrainBackboneConfig, 'device')}).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt.")] = False,
    no_augment: Annotated[bool, typer.Option(help="Disable image augmentation.")] = False,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many steps.")] = None,
) -> None:
    """Pretrain the student's ResNet on the renderer's per-pixel depth and class; writes OUT/backbone.pth for
    train-student --backbone-weights (one pretraining per world, shared by every student)."""
    from tigbev.stages import pretrain_backbone as stage

    result = stage.run(PretrainBackboneConfig(
        preset=preset, dataroot=dataroot, split=split, out_dir=out, val_split=val_split, resume=resume,
        augment=not no_augment, max_steps=max_steps,
        **_given(epochs=epochs, batch_size=batch_size, lr=lr, workers=workers, seed=seed, device=device)))
    typer.echo(f"pretrained: {result.steps} steps in {result.seconds:.0f} s, backbone {result.backbone}")
    if result.metrics is not None:
        typer.echo("  ".join(f"{k} {v:.3f}" for k, v in result.metrics.items()))


@app.command("import-teacher")
@_guarded
def import_teacher(
    mmdet3d_checkpoint: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                                       help="mmdetection3d CenterPoint .pth (voxel 0.1, SECFPN).")],
    out: Annotated[Path, typer.Option(help="tigbev teacher checkpoint to write (e.g. teacher/last.pt).")],
    box_convention: Annotated[str, typer.Option(help="'mmdet3d-v1' (v1.0.0_models) or 'mmdet3d-v0' (v0.x).")]
    = "mmdet3d-v1",
) -> None:
    """Convert the published mmdetection3d CenterPoint weights into a tigbev teacher checkpoint (nuscenes preset)."""
    from tigbev.models.teacher.centerpoint import teacher_preset
    from tigbev.models.teacher.checkpoint import save_checkpoint
    from tigbev.models.teacher.mmdet3d_weights import load_mmdet3d_centerpoint
    from tigbev.utils.provenance import file_sha256, provenance

    if out.exists():
        raise _fail(TigbevError(f"{out} exists; choose a new path"))
    model = load_mmdet3d_centerpoint(mmdet3d_checkpoint, box_convention=box_convention)  # type: ignore[arg-type]
    save_checkpoint(out, {
        "model": model.state_dict(), "teacher_config": teacher_preset("nuscenes").to_dict(),
        "train_config": {"preset": "nuscenes", "imported_from": str(mmdet3d_checkpoint),
                         "box_convention": box_convention},
        "provenance": provenance(source_sha256=file_sha256(mmdet3d_checkpoint)),
    })
    typer.echo(f"wrote {out} (nuscenes preset) from {mmdet3d_checkpoint}")


@app.command("extract-teacher")
@_guarded
def extract_teacher(
    dataroot: Annotated[Path, typer.Option(exists=True, file_okay=False, help="nuScenes-format dataroot.")],
    split: Annotated[str, typer.Option(help="Split to extract.")],
    out: Annotated[str, typer.Option(help="Cache: a directory or an fsspec URL (s3://..., memory://...).")],
    teacher_checkpoint: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help=(
        "Teacher last.pt (a tigbev CenterPoint), or the file handed to --teacher-factory."))] = None,
    teacher_factory: Annotated[str | None, typer.Option(help=(
        "Any LiDAR teacher: 'package.module:callable', called with (checkpoint, device), returning an object with "
        "bev_map, grid, channels, num_sweeps, point_range_m, fingerprint, describe (docs/USAGE.md)."))] = None,
    features: Annotated[str | None, typer.Option(help=(
        "'foreground' (cells around boxes) or 'dense' (whole map) "
        f"(default {_default(ExtractTeacherConfig, 'features')})."))] = None,
    feature_dtype: Annotated[str | None, typer.Option(help=(
        "'float16' or 'int8' (per-channel scale; foreground) "
        f"(default {_default(ExtractTeacherConfig, 'feature_dtype')})."))] = None,
    compression: Annotated[str | None, typer.Option(help=(
        "'none' (fastest reads), 'zstd' (fewer bytes) or 'auto' (zstd for dense, none for foreground) "
        f"(default {_default(ExtractTeacherConfig, 'compression')})."))] = None,
    variants: Annotated[str | None, typer.Option(help=(
        "Teacher maps stored per sample: 'canonical' (un-augmented; BEV augmentation replayed on it), 'flips' "
        "(the four x/y-flipped clouds: flips exact) or 'draws' (canonical + --draws stored BDA draws: exact) "
        f"(default {_default(ExtractTeacherConfig, 'variants')})."))] = None,
    draws: Annotated[int | None, typer.Option(min=1, help=(
        f"With --variants draws: BDA draws per sample (default {_default(ExtractTeacherConfig, 'draws')})."))]
    = None,
    shard_samples: Annotated[int | None, typer.Option(min=1, help=(
        "Samples per shard (unit of writing/resuming) "
        f"(default {_default(ExtractTeacherConfig, 'shard_samples')})."))] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help=(
        f"Teacher batch size (divides --shard-samples) (default {_default(ExtractTeacherConfig, 'batch_size')})."))
    ] = None,
    workers: Annotated[int | None, typer.Option(
        min=0, help=f"DataLoader processes (default {_default(ExtractTeacherConfig, 'workers')}).")] = None,
    device: Annotated[str | None, typer.Option(
        help=f"'auto', 'cpu' or 'cuda[:N]' (default {_default(ExtractTeacherConfig, 'device')}).")] = None,
    keypoint_grid: Annotated[int | None, typer.Option(min=2, help=(
        f"Keypoints per box side (default {_default(ExtractTeacherConfig, 'keypoint_grid')}; the demo uses 12)."))
    ] = None,
    keypoint_enlarge_m: Annotated[float | None, typer.Option(help=(
        "Metres each box grows by on every side before its keypoints are laid "
        f"(default {_default(ExtractTeacherConfig, 'keypoint_enlarge_m')})."))] = None,
    shard: Annotated[str, typer.Option(help="This process's part I/N of the work (torchrun sets it itself).")]
    = "0/1",
) -> None:
    """Run the frozen teacher once over a split and write (or resume) the cache."""
    from tigbev.stages import extract_teacher as stage

    index, _, count = shard.partition("/")
    if not (index.isdigit() and count.isdigit()):
        raise _fail(ValueError(f"--shard must look like I/N (e.g. 0/4), got {shard!r}"))
    cfg = ExtractTeacherConfig(
        teacher_checkpoint=teacher_checkpoint, teacher_factory=teacher_factory, dataroot=dataroot, split=split,
        out_dir=out,
        shard_index=int(index), num_parts=int(count),
        **_given(features=features, feature_dtype=feature_dtype, compression=compression, variants=variants,
                 draws=draws, shard_samples=shard_samples, batch_size=batch_size,
                 workers=workers, device=device, keypoint_grid=keypoint_grid, keypoint_enlarge_m=keypoint_enlarge_m),
    )
    result = stage.run(cfg)
    state = "complete" if result.complete else "partial (other parts still running or to run)"
    typer.echo(f"cache {result.url}: wrote {result.samples_written} samples, skipped {result.samples_skipped} "
               f"already done, {result.seconds:.1f} s; {state}")


@app.command("train-student")
@_guarded
def train_student(
    preset: Annotated[str, typer.Option(help="'demo' (CPU-sized) or 'nuscenes' (TiG-BEV-R50).")],
    dataroot: Annotated[Path, typer.Option(exists=True, file_okay=False, help="nuScenes-format dataroot.")],
    split: Annotated[str, typer.Option(help="Training split (the cache's).")],
    out: Annotated[Path, typer.Option(help="Run directory (new, or an existing one with --resume).")],
    cache: Annotated[str | None, typer.Option(help="Teacher cache of this split (extract-teacher's --out).")] = None,
    teacher: Annotated[str, typer.Option(help="'cache', 'online' (live teacher each step) or 'none'.")] = "cache",
    teacher_checkpoint: Annotated[Path | None, typer.Option(help="Teacher checkpoint for --teacher online.")] = None,
    teacher_factory: Annotated[str | None, typer.Option(help=(
        "With --teacher online: any LiDAR teacher, 'package.module:callable' (as extract-teacher's)."))] = None,
    variant: Annotated[str, typer.Option(help="'bevdepth' (camera-aware depth) or 'bevdet'.")] = "bevdepth",
    backbone_weights: Annotated[Path | None, typer.Option(exists=True, dir_okay=False,
                                                          help="torchvision ImageNet .pth for the ResNet.")] = None,
    val_split: Annotated[str | None, typer.Option(help="Evaluate the final model on this split.")] = None,
    w_depth: Annotated[float | None, typer.Option(
        help=f"Dense depth loss weight (default {_default(LossWeights, 'depth')}).")] = None,
    w_inner_depth: Annotated[float | None, typer.Option(
        help=f"Inner-depth loss weight (TiG) (default {_default(LossWeights, 'inner_depth')}).")] = None,
    w_keypoint: Annotated[float | None, typer.Option(
        help=f"Inter-keypoint distillation weight (TiG) (default {_default(LossWeights, 'inter_keypoint')}).")] = None,
    w_channel: Annotated[float | None, typer.Option(
        help=f"Inter-channel distillation weight (TiG) (default {_default(LossWeights, 'inter_channel')}).")] = None,
    w_dense_feature: Annotated[float | None, typer.Option(
        help=f"Dense BEV feature MSE (a baseline, not TiG) (default {_default(LossWeights, 'dense_feature')}).")
    ] = None,
    w_self_assessment: Annotated[float | None, typer.Option(
        help="Self-assessment cross-attention distillation (METHOD.md section 7; TaT uses 0.1) "
             f"(default {_default(LossWeights, 'self_assessment')}).")] = None,
    keypoint_grid: Annotated[int | None, typer.Option(min=2, help=(
        f"Keypoints per box side, online teacher (default {_default(TrainStudentConfig, 'keypoint_grid')})."))] = None,
    baseline: Annotated[bool, typer.Option(help="No distillation: detection + dense depth only.")] = False,
    epochs: Annotated[int | None, typer.Option(
        min=1, help=f"Default: {_default(TrainStudentConfig, 'epochs')}.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help=f"Default: {_default(TrainStudentConfig, 'batch_size')}.")] = None,
    lr: Annotated[float | None, typer.Option(help=(
        f"Peak learning rate (AdamW), a finite number > 0 (default {_default(TrainStudentConfig, 'lr')})."))] = None,
    workers: Annotated[int | None, typer.Option(
        min=0, help=f"Default: {_default(TrainStudentConfig, 'workers')}.")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Default: {_default(TrainStudentConfig, 'seed')}.")] = None,
    device: Annotated[str | None, typer.Option(
        help=f"'auto', 'cpu' or 'cuda[:N]' (default {_default(TrainStudentConfig, 'device')}).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt.")] = False,
    no_augment: Annotated[bool, typer.Option(help="Disable image and BEV augmentation.")] = False,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many steps.")] = None,
    frames: Annotated[int | None, typer.Option(min=1, help=(
        "Key frames per sample, the current one included: 2 for BEVDet4D / BEVDepth4D "
        f"(default {_default(TrainStudentConfig, 'frames')})."))] = None,
    sampler: Annotated[str | None, typer.Option(help=(
        "'uniform' or 'cbgs' (class-balanced grouping and sampling, as mmdet3d's CBGSDataset) "
        f"(default {_default(TrainStudentConfig, 'sampler')})."))] = None,
    input_hw: Annotated[str | None, typer.Option(help=(
        "Network input HxW in pixels, e.g. 192x528 (default: the preset's, demo 128x352, nuscenes 256x704); "
        "any cache serves any size."))] = None,
    tensorboard: Annotated[bool, typer.Option(help=(
        "Also log to OUT/tensorboard: metrics.jsonl's scalars, the final metrics and a BEV picture "
        "(pip install 'tigbev[tensorboard]')."))] = False,
) -> None:
    """Train a camera student with the TiG-BEV losses from the cache (or the online teacher, or none)."""
    from tigbev.stages import train_student as stage

    weights = LossWeights.baseline() if baseline else LossWeights(**_given(
        depth=w_depth, inner_depth=w_inner_depth, inter_keypoint=w_keypoint, inter_channel=w_channel,
        dense_feature=w_dense_feature, self_assessment=w_self_assessment))
    cfg = TrainStudentConfig(
        preset=preset, dataroot=dataroot, split=split, out_dir=out, cache=cache,
        teacher="none" if baseline and teacher == "cache" and cache is None else teacher,
        teacher_checkpoint=teacher_checkpoint, teacher_factory=teacher_factory, variant=variant,
        backbone_weights=backbone_weights,
        weights=weights, val_split=val_split, resume=resume, augment=not no_augment, max_steps=max_steps,
        tensorboard=tensorboard,
        **_given(epochs=epochs, batch_size=batch_size, lr=lr, workers=workers, seed=seed, device=device,
                 keypoint_grid=keypoint_grid, frames=frames, sampler=sampler, input_hw=_image_hw(input_hw)),
    )
    result = stage.run(cfg)
    typer.echo(f"student: {result.steps} steps in {result.seconds:.0f} s ({result.mean_step_s:.2f} s/step), "
               f"{result.epoch_size} samples per epoch ({cfg.sampler}), checkpoint {result.checkpoint}")
    if result.metrics is not None:
        typer.echo(f"{val_split}: mAP {result.metrics['mAP']:.4f}  NDS {result.metrics['NDS']:.4f}")


@app.command("evaluate")
@_guarded
def evaluate(
    checkpoint: Annotated[Path | None, typer.Argument(help="Teacher or student checkpoint (last.pt).")] = None,
    dataroot: Annotated[Path, typer.Option(exists=True, file_okay=False, help="nuScenes-format dataroot.")]
    = Path("."),
    split: Annotated[str, typer.Option(help="Split to evaluate (predefined or from splits.json).")] = "val",
    out: Annotated[Path, typer.Option(help="Output directory for metrics, plots and the result JSON.")]
    = Path("eval"),
    gt_as_predictions: Annotated[bool, typer.Option(help="Score the ground truth itself (no checkpoint).")] = False,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help=f"Samples per forward (default {_default(EvaluateConfig, 'batch_size')}).")] = None,
    device: Annotated[str | None, typer.Option(
        help=f"'auto', 'cpu' or 'cuda[:N]' (default {_default(EvaluateConfig, 'device')}).")] = None,
    bev_samples: Annotated[int | None, typer.Option(min=0, help=(
        "Top-view pictures (predictions against the ground truth) of the first samples of the split "
        f"(default {_default(EvaluateConfig, 'bev_samples')}; 0: none)."))] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the results of another checkpoint that --out holds (refused without it; "
                            "results of the same checkpoint are always replaced).")] = False,
) -> None:
    """Official nuScenes detection metrics (DetectionEval, detection_cvpr_2019) with plots and a Markdown table;
    metrics.json records the checkpoint (path, sha256, step), the dataset and the tigbev version that produced it."""
    from tigbev.stages import evaluate as stage

    if checkpoint is not None and not checkpoint.is_file():
        raise _fail(TigbevError(f"checkpoint not found: {checkpoint}"))
    result = stage.run(EvaluateConfig(checkpoint=checkpoint, dataroot=dataroot, split=split, out_dir=out,
                                      gt_as_predictions=gt_as_predictions, overwrite=overwrite,
                                      **_given(batch_size=batch_size, device=device, bev_samples=bev_samples)))
    m = result.metrics
    typer.echo((out / "metrics.md").read_text())
    typer.echo(f"{split}: mAP {m['mAP']:.4f}  NDS {m['NDS']:.4f}  ({result.seconds:.0f} s) -> {out}")


@app.command("demo")
@_guarded
def demo(
    out: Annotated[Path, typer.Option(help="Directory for every stage's output (reused when rerun).")] = Path("runs/demo"),
    seed: Annotated[int | None, typer.Option(help=f"(default {_default(_DemoConfig, 'seed')})")] = None,
    teacher_epochs: Annotated[int | None, typer.Option(
        min=1, help=f"(default {_default(_DemoConfig, 'teacher_epochs')})")] = None,
    student_epochs: Annotated[int | None, typer.Option(
        min=1, help=f"(default {_default(_DemoConfig, 'student_epochs')}: 50 steps of batch 2 each)")] = None,
    pretrain_epochs: Annotated[int | None, typer.Option(
        min=0, help=f"Backbone pretraining shared by both students (default "
                    f"{_default(_DemoConfig, 'pretrain_epochs')}; 0: students start from random weights).")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help=f"(default {_default(_DemoConfig, 'workers')})")]
    = None,
    tiny: Annotated[bool, typer.Option(help="A seconds-long smoke configuration of every stage.")] = False,
) -> None:
    """synth -> train-teacher -> extract-teacher -> train-student (baseline, TiG) -> evaluate: the whole chain."""
    from tigbev.pipeline.demo import run, summary_reading, summary_table

    summary = run(_DemoConfig(out_dir=out, tiny=tiny, **_given(seed=seed, teacher_epochs=teacher_epochs,
                                                               student_epochs=student_epochs, workers=workers,
                                                               pretrain_epochs=pretrain_epochs)))
    typer.echo(summary_table(summary))
    typer.echo(summary_reading(summary, out))


@app.command("ablate")
@_guarded
def ablate(
    preset: Annotated[str | None, typer.Option(help="World and budget: 'demo' (tigbev demo's world) or 'study' (1000 "
                                                    "train / 200 val samples, pretrained backbone) (default "
                                                    f"{_default(_AblateConfig, 'preset')}).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for the world and every row (shared with `tigbev demo`).")]
    = Path("runs/ablate"),
    seeds: Annotated[str | None, typer.Option(help=(
        "Comma-separated seeds; the table shows their mean and every paired comparison its 95 % interval (default "
        "0,1,2,3,4 for the study preset, 0,1 for the demo's)."))] = None,
    rows: Annotated[str | None, typer.Option(help=(
        "Comma-separated row keys (default: every row; with --augment the BDA comparison: "
        f"{','.join(_BDA_ROWS)})."))] = None,
    augment: Annotated[bool, typer.Option(help=(
        "Train every row with the published image augmentation and BDA; the rows then compare the online "
        "teacher with each cache mode (ablation-aug.*)."))] = False,
    teacher_epochs: Annotated[int | None, typer.Option(min=1, help="Default: the preset's.")] = None,
    student_epochs: Annotated[int | None, typer.Option(min=1, help="Default: the preset's.")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help=f"(default {_default(_AblateConfig, 'workers')})")]
    = None,
    frames: Annotated[int | None, typer.Option(min=1, help=(
        "Key frames per student sample (2: BEVDet4D / BEVDepth4D); tables ablation-f<N>.* (default 1)."))] = None,
    sampler: Annotated[str | None, typer.Option(help=(
        "'uniform' or 'cbgs' (class-balanced sampling) for every student (default uniform)."))] = None,
    tiny: Annotated[bool, typer.Option(help="A seconds-long smoke configuration of every row.")] = False,
) -> None:
    """The paper's ablation in miniature: each loss component added in turn, same seeds and budget, evaluated."""
    from tigbev.pipeline.ablate import ablation_table, run

    if preset is not None and preset not in ("demo", "study"):
        raise _fail(ValueError(
            f"--preset {preset!r}: the ablation runs on synthetic worlds only ('demo' or 'study'); on real data "
            "train one `tigbev train-student` per row with the --w-* weights and score each with `tigbev evaluate`"))
    given = _given(preset=preset, teacher_epochs=teacher_epochs, student_epochs=student_epochs, workers=workers,
                   frames=frames, sampler=sampler,
                   seeds=None if seeds is None else tuple(int(s) for s in seeds.split(",") if s.strip()),
                   rows=None if rows is None else tuple(r.strip() for r in rows.split(",") if r.strip()))
    cfg = _AblateConfig(out_dir=out, tiny=tiny, augment=augment, **given)
    result = run(cfg)
    typer.echo(ablation_table(result))
    stem = f"ablation{cfg.tag}"
    typer.echo(f"table: {out / f'{stem}.md'}, chart: {out / f'{stem}.png'}")


@app.command("bench")
@_guarded
def bench(
    preset: Annotated[str, typer.Option(help="'demo' (synthetic data by default) or 'nuscenes' (needs --dataroot).")],
    out: Annotated[Path, typer.Option(help="Output directory: bench.json, bench.md, bench.png (and work/).")],
    dataroot: Annotated[Path | None, typer.Option(exists=True, file_okay=False,
                                                  help="Dataset (default for demo: a synthetic one in OUT/work).")]
    = None,
    split: Annotated[str | None, typer.Option(help="Split (default: synth_train / real_slice).")] = None,
    teacher_checkpoint: Annotated[Path | None, typer.Option(exists=True, dir_okay=False,
                                                            help="Teacher last.pt (default: seeded random weights).")]
    = None,
    repeats: Annotated[int | None, typer.Option(min=1, help="Interleaved repeats of every timed comparison "
                                                           f"(default {_default(_BenchConfig, 'repeats')}).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Timed steps per mode and repeat.")] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="Samples of the 1x size (tokens repeat if needed).")]
    = None,
    device: Annotated[str | None, typer.Option(
        help=f"'auto', 'cpu' or 'cuda[:N]' (default {_default(_BenchConfig, 'device')}).")] = None,
    seed: Annotated[int | None, typer.Option(help=f"(default {_default(_BenchConfig, 'seed')})")] = None,
    frames: Annotated[int | None, typer.Option(min=1, help=(
        "Also time the cache mode's step with this many key frames per sample (BEVDet4D: 2)."))] = None,
    cache: Annotated[str | None, typer.Option(help=(
        "Time the student side alone from this cache of --split (no teacher, spconv or devkit needed: the GPU "
        "check)."))] = None,
    tiny: Annotated[bool, typer.Option(help="A seconds-long smoke configuration (tests).")] = False,
) -> None:
    """Cost of distillation with and without the cache: steps, loader, extraction, storage, growth; side by side."""
    from tigbev.bench import run

    result = run(_BenchConfig(preset=preset, out_dir=out, tiny=tiny,  # type: ignore[arg-type]
                              **_given(dataroot=dataroot, split=split, teacher_checkpoint=teacher_checkpoint,
                                       repeats=repeats, steps=steps, samples=samples, device=device, seed=seed,
                                       frames=frames, cache=cache)))
    typer.echo(result.markdown_path.read_text())
    typer.echo(f"wrote {result.json_path}, {result.markdown_path}, {result.plot_path}")


cache_app = typer.Typer(help="Inspect and check a teacher cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
@_guarded
def cache_info_cmd(cache: Annotated[str, typer.Argument(help="Cache directory or URL.")]) -> None:
    """Samples, completeness, bytes per sample per record section, compression ratio, teacher, grid, maps."""
    from tigbev.cache.tools import cache_info

    info = cache_info(cache)
    typer.echo(f"cache      {info['url']}")
    state = "complete" if info["complete"] else ", ".join(
        word for word, on in (("INCOMPLETE", not info["marked_complete"]), ("DAMAGED", info["faults"])) if on)
    typer.echo(f"samples    {info['done']} / {info['samples']} done, {state}")
    for fault in info["faults"][:5]:
        typer.echo(f"fault      {fault}")
    if len(info["faults"]) > 5:
        typer.echo(f"fault      ... and {len(info['faults']) - 5} more (`tigbev cache verify` lists every fault)")
    typer.echo(f"checked    the files and shard indexes of the {info['checked_shards']} done shard(s); not verified: "
               f"{info['not_verified']}")
    typer.echo(f"dataset    {info['version']} split {info['split']}")
    typer.echo(f"teacher    sha256 {info['teacher_sha256'][:16]}...")
    g = info["grid"]
    typer.echo(f"grid       x [{g['x_min_m']}, {g['x_max_m']}) y [{g['y_min_m']}, {g['y_max_m']}) m, cell {g['cell_m']} m")
    f = info["features"]
    typer.echo(f"features   {f['mode']} {f['dtype']} x {f['channels']} ch, per-channel scale")
    typer.echo(f"maps       {info['variants']['count']} per sample ({info['variants']['kind']}); format "
               f"{info['format_version']}")
    for name, b in info["bytes_per_sample"].items():
        typer.echo(f"  {name:<12} {b / 1024:10.1f} KiB/sample")
    typer.echo(f"total      {info['bytes_per_sample_total'] / 1024:.1f} KiB/sample, compression "
               f"{info['compression_ratio']:.2f}x")
    for writer in info["writers"]:
        typer.echo(f"writing    {writer}")


@cache_app.command("verify")
@_guarded
def cache_verify_cmd(cache: Annotated[str, typer.Argument(help="Cache directory or URL.")]) -> None:
    """Read every chunk, check checksums and the index; name each bad sample and array; exit 1 on any fault."""
    from tigbev.cache.tools import verify_cache

    faults = verify_cache(cache)
    for fault in faults:
        typer.secho(f"FAULT {fault}", fg=typer.colors.RED, err=True)
    if faults:
        typer.echo(f"{len(faults)} fault(s) in {cache}")
        raise typer.Exit(code=1)
    typer.echo(f"{cache}: OK, complete: every record and chunk of every sample present, read and checked")


@cache_app.command("dump")
@_guarded
def cache_dump_cmd(
    cache: Annotated[str, typer.Argument(help="Cache directory or URL.")],
    sample: Annotated[str, typer.Option(help="Sample token.")],
    out: Annotated[Path, typer.Option(help="Output .npz file (new).")],
) -> None:
    """Write one sample's cached content as npz (keys documented in tigbev/cache/tools.py)."""
    from tigbev.cache.tools import dump_sample

    if out.exists():
        raise _fail(TigbevError(f"--out {out} exists; choose a new path (nothing is overwritten)"))
    path = dump_sample(cache, sample, out)
    typer.echo(f"wrote {path}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
