"""The recipe registry: network names -> functions that emit ONNX through GraphBuilder.

Recipes live in the top-level ``recipes`` package, one module per family; every
module there is imported on first use, and its ``@register`` decorators fill the
registry. A recipe function has the signature::

    def resnet18(b: GraphBuilder, x: Tensor, num_classes: int = 1000, **options) -> Tensor | dict[str, Tensor]

and returns its output tensor (named ``output``) or a dict of named outputs.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from graphgen.builder import GraphBuilder
from graphgen.errors import UnknownNameError, UserError


@dataclass(frozen=True)
class Recipe:
    name: str
    fn: Callable
    family: str
    source: str  # "torchvision" or a paper citation
    input_size: tuple[int, int] = (224, 224)
    in_channels: int = 3
    num_classes: int | None = 1000
    #: a small input size that still exercises every layer (tests and CI use it)
    test_input_size: tuple[int, int] | None = None
    aliases: tuple[str, ...] = ()
    #: smallest input size the recipe accepts (e.g. fixed-size classifier heads)
    fixed_input: bool = False

    @property
    def is_torchvision(self) -> bool:
        return self.source == "torchvision"

    @property
    def doc(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n")[0]

    @property
    def options(self) -> list[str]:
        sig = inspect.signature(self.fn)
        return [p for p in list(sig.parameters)[2:] if sig.parameters[p].kind == inspect.Parameter.KEYWORD_ONLY
                or sig.parameters[p].default is not inspect.Parameter.empty]


_RECIPES: dict[str, Recipe] = {}
_ALIASES: dict[str, str] = {}
_LOADED = False


def register(name: str, *, family: str, source: str = "torchvision", input_size=(224, 224), in_channels: int = 3,
             num_classes: int | None = 1000, test_input_size=None, aliases=(), fixed_input: bool = False):
    """Decorator adding a recipe function to the registry under ``name``."""

    def deco(fn):
        if name in _RECIPES or name in _ALIASES:
            raise ValueError(f"recipe {name!r} registered twice")
        _RECIPES[name] = Recipe(name, fn, family, source, tuple(input_size), in_channels, num_classes,
                                tuple(test_input_size) if test_input_size else None, tuple(aliases), fixed_input)
        for a in aliases:
            _ALIASES[a] = name
        return fn

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    import recipes

    for mod in sorted(pkgutil.iter_modules(recipes.__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"recipes.{mod.name}")
    _LOADED = True


def names(include_aliases: bool = False) -> list[str]:
    _load_all()
    out = list(_RECIPES)
    if include_aliases:
        out += list(_ALIASES)
    return sorted(out)


def recipes() -> list[Recipe]:
    _load_all()
    return [_RECIPES[n] for n in sorted(_RECIPES)]


def closest(name: str, choices: list[str]) -> str | None:
    m = difflib.get_close_matches(name, choices, n=1, cutoff=0.4)
    return m[0] if m else None


def get(name: str) -> Recipe:
    _load_all()
    key = name.strip().lower()
    if key in _RECIPES:
        return _RECIPES[key]
    if key in _ALIASES:
        return _RECIPES[_ALIASES[key]]
    choices = names(include_aliases=True)
    hint = closest(key, choices)
    raise UnknownNameError(
        f"unknown model {name!r}" + (f" (did you mean {hint!r}?)" if hint else "")
        + f"; valid models: {', '.join(choices)}; or a path to an .onnx file"
    )


@dataclass
class RecipeGraph:
    """A recipe's ONNX model plus what the builder knows about its tensors."""

    recipe: Recipe
    model: onnx.ModelProto
    input_size: tuple[int, int]
    num_classes: int | None
    parameter_count: int
    state_dict: dict[str, np.ndarray] = field(repr=False)
    options: dict = field(default_factory=dict)
    #: trainable parameters (torchvision's `parameters()`); the rest of state_dict are buffers
    parameter_names: list[str] = field(default_factory=list)


def build_recipe(name: str, *, input_size=None, num_classes: int | None = None, weights: dict | None = None,
                 batch: int = 1, seed: int = 0, check: bool = True, shape_only: bool = False,
                 **options) -> RecipeGraph:
    """Run a recipe and return its (unoptimized) ONNX graph."""
    recipe = get(name)
    h, w = tuple(input_size) if input_size else recipe.input_size
    if recipe.fixed_input and (h, w) != recipe.input_size:
        raise UserError(f"{recipe.name} takes only input size {recipe.input_size[0]}x{recipe.input_size[1]}")
    if h < 1 or w < 1:
        raise UserError(f"input size must be positive, got {h}x{w}")
    kwargs = dict(options)
    nc = num_classes if num_classes is not None else recipe.num_classes
    if recipe.num_classes is not None:
        if nc < 1:
            raise UserError(f"--num-classes must be at least 1, got {nc}")
        kwargs["num_classes"] = nc
    unknown = set(options) - set(recipe.options)
    if unknown:
        raise UserError(f"{recipe.name} has no option {', '.join(sorted(unknown))}; "
                        f"its options: {', '.join(recipe.options) or 'none'}")
    b = GraphBuilder(recipe.name, seed=seed, weights=weights, shape_only=shape_only)
    x = b.input("input", (batch, recipe.in_channels, h, w))
    try:
        out = recipe.fn(b, x, **kwargs)
    except (ValueError, IndexError, ZeroDivisionError) as e:
        raise UserError(f"{recipe.name} cannot be built at input size {h}x{w}: {e}") from e
    if any(s < 1 for t in (out.values() if isinstance(out, dict) else [out]) for s in t.shape):
        raise UserError(f"{recipe.name}: input size {h}x{w} is too small (a feature map shrinks to nothing)")
    if isinstance(out, dict):
        for k, t in out.items():
            b.output(t, k)
    else:
        b.output(out, "output")
    model = b.build(check=check, doc=f"{recipe.name}: {recipe.doc}")
    return RecipeGraph(recipe, model, (h, w), nc if recipe.num_classes is not None else None,
                       b.parameter_count(), b.state_dict(), kwargs, list(b.parameter_names))
