"""The ``tigbev`` command line: each command parses its options, builds a config and calls one stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tigbev.errors import TigbevError

app = typer.Typer(
    name="tigbev",
    help="TiG-BEV LiDAR-to-camera distillation with an offline teacher cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """TiG-BEV LiDAR-to-camera distillation with an offline teacher cache."""


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Dataroot to create (must not exist, or be empty).")],
    scenes: Annotated[int, typer.Option(min=1, help="Number of scenes.")] = 12,
    samples_per_scene: Annotated[int, typer.Option(min=2, help="Key frames per scene (2 Hz).")] = 10,
    val_scenes: Annotated[
        int | None, typer.Option(min=0, help="Scenes in the synth_val split (the last ones); default: a sixth.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the output is a deterministic function of it.")] = 0,
    image_width: Annotated[int, typer.Option(help="Camera image width (px).")] = 480,
    image_height: Annotated[int, typer.Option(help="Camera image height (px).")] = 270,
    sweeps_per_sample: Annotated[int, typer.Option(min=0, help="Non-key LiDAR sweeps between key frames.")] = 2,
    lidar_azimuth_steps: Annotated[int, typer.Option(help="LiDAR horizontal resolution (steps per turn).")] = 1084,
    object_density: Annotated[float, typer.Option(min=0.0, help="Scales the number of extra objects.")] = 1.0,
    workers: Annotated[int, typer.Option(min=1, help="Processes rendering scenes in parallel.")] = 2,
) -> None:
    """Write a synthetic nuScenes-format dataroot (splits synth_train and synth_val)."""
    from tigbev.config import SynthConfig
    from tigbev.data.synth.writer import write_synthetic_dataset

    try:
        cfg = SynthConfig(
            out_dir=out_dir, scenes=scenes, samples_per_scene=samples_per_scene, val_scenes=val_scenes, seed=seed,
            image_width=image_width, image_height=image_height, sweeps_per_sample=sweeps_per_sample,
            lidar_azimuth_steps=lidar_azimuth_steps, object_density=object_density, workers=workers,
        )
        result = write_synthetic_dataset(cfg)
    except (TigbevError, ValueError) as exc:
        raise _fail(exc) from None
    typer.echo(
        f"wrote {result.num_samples} samples ({result.num_annotations} annotations) to {result.dataroot} "
        f"in {result.seconds:.1f} s; version {result.version}, splits {result.train_split} / {result.val_split}"
    )


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
