"""Every training setting, declared once: name, type, bounds or choices, help, group.

The stage recipes (``stages/stage<N>.toml``) give each setting its value per stage; the CLI
options of ``train-stage`` (and the subsets ``benchmark`` and ``show-augmentation`` take),
the validation of a recipe or a saved ``recipe.json``, and the options table of
docs/options.md all come from :data:`SETTINGS`. This module imports nothing heavy, so
``deeppose --help`` can build its options from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import DeepPoseError

# Backbones a run may name (recipe and run.json key ``architecture``); core/weights.py holds
# each one's layer table.
ARCHITECTURES = ("alexnet",)
MIN_INPUT_SIZE = 67  # the smallest crop that still leaves a 1x1 map after AlexNet's pool5
PRECISIONS = ("fp32", "bf16", "fp16")  # which an engine supports: engines.ENGINES
OPTIMIZERS = ("MomentumSGD", "Adam")
LOSSES = ("l2", "l1", "laplace")  # core/losses.py
SCHEDULES = ("constant", "cosine", "step")  # core/schedules.py
OUTSIDE_JOINTS = ("drop", "keep")
DISPLACEMENT_SOURCES = ("train", "val")
DISPLACEMENT_SAMPLING = ("normal", "empirical")
REFINE_JOINTS = ("own", "all")

GROUPS = {
    "network": "Network",
    "loss": "Loss",
    "optimizer": "Optimizer and schedule",
    "run": "Run",
    "augmentation": "Augmentation",
    "refinement": "Refinement stages (2 and later)",
}


@dataclass(frozen=True)
class Setting:
    """One training setting: a recipe key, a ``TrainConfig`` field and a CLI option."""

    name: str
    kind: type                       # int, float, bool or str
    default: Any                     # when no recipe gives a value
    help: str
    group: str
    choices: tuple[str, ...] | None = None
    low: float | None = None         # bounds of numbers; open ends with low_open / high_open
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False           # None is a value (e.g. no --max-iterations)
    flag: str | None = None          # the CLI option; default --name-with-dashes
    recipe: bool = True              # a stage recipe may set it (else the command line only)

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def switch(self) -> str:
        """A boolean's on/off option pair, e.g. ``--flip/--no-flip``."""
        return self.flag or f"{self.option}/--no-{self.option[2:]}"

    def bounds_text(self) -> str:
        if self.choices:
            return ", ".join(self.choices)
        if self.low is None and self.high is None:
            return ""
        def show(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        low = "" if self.low is None else f"{show(self.low)} {'<' if self.low_open else '<='} "
        high = ("" if self.high is None
                else f" {'<' if self.high_open else '<='} {show(self.high)}")
        return f"{low}x{high}"

    def check(self, value: Any) -> Any:
        """``value`` as this setting's type, or a one-line error saying what is wrong."""
        where = self.option
        if value is None:
            if self.nullable:
                return None
            raise DeepPoseError(f"{where} needs a value")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise DeepPoseError(f"{where} must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise DeepPoseError(f"{where} must be a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise DeepPoseError(f"{where} must be one of {', '.join(self.choices)}, "
                                    f"got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DeepPoseError(f"{where} must be a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise DeepPoseError(f"{where} must be a finite number, got {value!r}")
        if self.kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise DeepPoseError(f"{where} must be a whole number, got {value!r}")
                value = int(value)
        else:
            try:
                value = float(value)
            except OverflowError:  # an int too large for a float
                raise DeepPoseError(f"{where} must be a finite number, got an integer of "
                                    f"{len(str(value))} digits") from None
        too_low = self.low is not None and (value <= self.low if self.low_open
                                            else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open
                                              else value > self.high)
        if too_low or too_high:
            raise DeepPoseError(f"{where} must be {self.bounds_text()}, got {value!r}")
        return value


def _s(name, kind, default, help, group, **extra) -> Setting:
    return Setting(name, kind, default, help, group, **extra)


SETTINGS: tuple[Setting, ...] = (
    # network
    _s("architecture", str, "alexnet", "Backbone.", "network", choices=ARCHITECTURES),
    _s("input_size", int, 227, "Side of the square crop, pixels.", "network",
       low=MIN_INPUT_SIZE, high=1024),
    _s("width", float, 1.0, "Channel multiplier of the AlexNet (1.0 = the paper's network).",
       "network", low=0, high=8, low_open=True),
    _s("batch_norm", bool, False, "Batch normalization after each convolution.", "network"),
    _s("dropout", float, 0.5, "Dropout ratio after fc6 and fc7 while training.", "network",
       low=0, high=1, high_open=True),
    # loss
    _s("loss", str, "l2", "Pose loss: squared error (DeepPose), absolute error, or the "
       "Laplace likelihood with scales the network predicts.", "loss", choices=LOSSES),
    _s("explicit_backward", bool, False, "The hand-written loss backward instead of autograd "
       "(l1 and l2).", "loss", recipe=False),
    _s("use_visibility", bool, True, "Train only on visible joints (LSPET's invisible ones "
       "carry junk coordinates).", "loss", flag="--visibility/--no-visibility", recipe=False),
    # optimizer
    _s("optimizer", str, "MomentumSGD", "Optimizer.", "optimizer", choices=OPTIMIZERS),
    _s("lr", float, 0.0005, "Learning rate (Adam: its step size).", "optimizer", low=0,
       low_open=True),
    _s("momentum", float, 0.9, "MomentumSGD's momentum.", "optimizer", low=0, high=1,
       high_open=True),
    _s("weight_decay", float, 0.0005, "L2 weight decay.", "optimizer", low=0),
    _s("lr_schedule", str, "constant", "Learning-rate schedule after the warm-up.",
       "optimizer", choices=SCHEDULES),
    _s("lr_warmup", int, 0, "Iterations of linear warm-up from 0.", "optimizer", low=0),
    _s("lr_final_ratio", float, 0.01, "cosine: the last learning rate as a fraction of --lr.",
       "optimizer", low=0, high=1),
    # run
    _s("epochs", int, 100, "Epochs to train.", "run", low=1),
    _s("max_iterations", int, None, "Stop after this many iterations (the schedule spans "
       "the iterations that run).", "run", low=1, nullable=True, recipe=False),
    _s("batch_size", int, 32, "Images per optimizer step.", "run", low=1),
    _s("seed", int, 0, "Seed of initialization, sample order and augmentation.", "run",
       low=0, high=2 ** 32 - 1),
    _s("device", str, "cpu", "cpu, cuda or cuda:N (Chainer runs on CuPy for cuda).", "run",
       recipe=False),
    _s("workers", int, None, "Data-loading worker processes (unset: none on cpu; on cuda all "
       "cores but 4, at most 16).", "run", low=0, high=256, nullable=True),
    _s("image_cache_gib", float, 2.0, "GiB of decoded images each loading process keeps in "
       "memory (0: decode every time).", "run", low=0, high=4096, flag="--image-cache"),
    _s("precision", str, "fp32", "Training-step arithmetic: fp32, or bf16/fp16 autocast with "
       "fp32 weights (chainer: fp32 or fp16).", "run", choices=PRECISIONS),
    _s("checkpoint_every", int, 500, "Iterations between checkpoints.", "run", low=1),
    _s("val_every", int, 1, "Validate after every N-th epoch and at the end.", "run", low=1),
    _s("init", str, None, "Start from these weights: a run directory or model file of either "
       "framework, or 'previous' (stage >= 2: the stage it refines).", "run", nullable=True),
    # augmentation
    _s("jitter_translation", float, 0.05, "Shift of the box centre, up to this fraction of "
       "its side.", "augmentation", low=0, high=2),
    _s("jitter_scale", float, 0.1, "Box side scaled by exp(uniform(-s, s)).", "augmentation",
       low=0, high=3),
    _s("rotation", float, 0.0, "Rotation, degrees: uniform(-r, r) about the crop centre.",
       "augmentation", low=0, high=180),
    _s("flip", bool, True, "Mirror half the samples, swapping left/right labels.",
       "augmentation"),
    _s("colour_noise", float, 0.1, "Per-channel colour gain and shift, up to this much.",
       "augmentation", low=0, high=1),
    _s("occlusion", float, 0.0, "Probability of one random erased rectangle.", "augmentation",
       low=0, high=1),
    _s("outside_joints", str, "keep", "Joints augmentation moves out of the crop: not "
       "trained on (drop) or kept.", "augmentation", choices=OUTSIDE_JOINTS),
    _s("jitter_off_fraction", float, 0.0, "The run's last fraction trains on the exact box "
       "(no translation, scale or rotation jitter).", "augmentation", low=0, high=1),
    # refinement
    _s("sigma", float, None, "Refinement box side in torso diameters.", "refinement", low=0,
       high=100, low_open=True, nullable=True),
    _s("samples_per_image", int, 1, "Simulated boxes per joint and image, per epoch.",
       "refinement", low=1, high=1000),
    _s("displacement_source", str, "train", "Split whose predictions give the displacement "
       "statistics.", "refinement", choices=DISPLACEMENT_SOURCES),
    _s("displacement_sampling", str, "normal", "Draw simulated displacements from the fitted "
       "normal or the measured ones.", "refinement", choices=DISPLACEMENT_SAMPLING),
    _s("refine_joints", str, "own", "Train only the crop's own joint, or every joint inside "
       "it.", "refinement", choices=REFINE_JOINTS),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def check_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe's values checked against their declarations (unknown keys refused)."""
    unknown = sorted(set(recipe) - set(BY_NAME) - {"stage"})
    if unknown:
        raise DeepPoseError(f"unknown recipe keys: {', '.join(unknown)}")
    return {name: BY_NAME[name].check(value) for name, value in recipe.items()
            if name in BY_NAME}


def recipe_defaults(stage_values: dict[int, dict[str, Any]], setting: Setting) -> str:
    """``recipe: X`` or ``recipe: stage 1 X, stage 2 Y`` for an option's help text;
    ``default: X`` for a setting no recipe sets."""
    def show(value: Any) -> str:
        return "unset" if value is None else str(value).lower() if isinstance(value, bool) \
            else str(value)

    values = {stage: recipe.get(setting.name) for stage, recipe in stage_values.items()
              if setting.name in recipe}
    if not values:
        return f"default: {show(setting.default)}"
    if len(set(map(repr, values.values()))) == 1 and len(values) == len(stage_values):
        return f"recipe: {show(next(iter(values.values())))}"
    return "recipe: " + ", ".join(f"stage {stage} {show(value)}"
                                  for stage, value in sorted(values.items()))


def options_markdown(stage_values: dict[int, dict[str, Any]]) -> str:
    """The docs table of every setting (docs/options.md is this text)."""
    lines = ["# Training options", "",
             "Every `train-stage` option, generated from the one declaration of the settings",
             "(`deeppose_cli/core/settings.py`) and the stage recipes (`stages/*.toml`).",
             "Each is also a recipe key; `recipe.json` in a run records the values it used.",
             "A test keeps this page equal to what the declaration generates",
             "(`python -m deeppose_cli.core.settings > docs/options.md` rewrites it).", ""]
    stages = sorted(stage_values)
    for group, title in GROUPS.items():
        lines += [f"## {title}", "",
                  "| option | values | " + " | ".join(f"stage {s}" for s in stages)
                  + " | what |",
                  "|---|---|" + "---|" * len(stages) + "---|"]
        for setting in (s for s in SETTINGS if s.group == group):
            cells = []
            for stage in stages:
                value = stage_values[stage].get(setting.name, setting.default)
                cells.append("-" if value is None else
                             f"`{str(value).lower() if isinstance(value, bool) else value}`")
            kind = "on/off" if setting.kind is bool else (setting.bounds_text()
                                                          or setting.kind.__name__)
            lines.append(f"| `{setting.option}` | {kind} | " + " | ".join(cells)
                         + f" | {setting.help} |")
        lines.append("")
    return "\n".join(lines)


def stage_recipes() -> dict[int, dict[str, Any]]:
    """The packaged stage recipes, by stage."""
    from .manifests import load_stage_recipe

    return {stage: load_stage_recipe(stage) for stage in (1, 2, 3)}


def setting_flags(values: dict[str, Any]) -> list[str]:
    """The ``train-stage`` options that give these settings these values (the inverse of
    the command line's parsing), e.g. ``{"width": 0.25, "flip": False}`` ->
    ``["--width", "0.25", "--no-flip"]``."""
    flags: list[str] = []
    for name, value in values.items():
        setting = BY_NAME[name]
        if setting.kind is bool:
            on, _, off = setting.switch.partition("/")
            flags.append(on if value else off)
        elif value is not None:
            flags += [setting.option, str(value)]
    return flags


if __name__ == "__main__":
    print(options_markdown(stage_recipes()), end="")

