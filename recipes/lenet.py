"""LeNet-5 (LeCun, Bottou, Bengio and Haffner, 1998, "Gradient-Based Learning Applied to
Document Recognition", Proc. IEEE 86(11)), Section II.B, Figure 2 and Table I.

The layers are the paper's C1-S2-C3-S4-C5-F6-output on a 1x32x32 image:

====== ================================================ =========== ==========
layer  paper                                            output      trainable
====== ================================================ =========== ==========
C1     6 feature maps, 5x5 conv                         6x28x28         156
S2     2x2 sum x trainable coefficient + bias per map   6x14x14          12
C3     16 maps, 5x5 conv on Table I's S2 subsets        16x10x10      1,516
S4     as S2                                            16x5x5           32
C5     120 feature maps, 5x5 conv                       120x1x1      48,120
F6     84 units, fully connected                        84           10,164
output 10 Euclidean RBF units, fixed parameters         10                0
====== ================================================ =========== ==========

``lenet5`` is the paper's network, 60,000 trainable parameters
(156 + 12 + 1,516 + 32 + 48,120 + 10,164):

* every unit up to F6 is squashed by the paper's ``f(a) = 1.7159 tanh(2a/3)`` (Section II.B,
  Appendix A: "units in layers up to F6 ... [pass a_i] through a sigmoid squashing function");
* S2/S4 add their four inputs (a 2x2/2 average pool times 4), multiply by a trainable
  coefficient and add a trainable bias per map: a depthwise 1x1 convolution (``s2.weight``
  [6, 1, 1, 1], ``s2.bias`` [6]);
* C3 follows Table I: maps 0-5 see 3 contiguous S2 maps, 6-11 see 4 contiguous ones, 12-14
  see 4 non-contiguous ones and 15 sees all 6 (6x76 + 6x101 + 3x101 + 151 = 1,516). Each group
  of maps with the same fan-in is one grouped convolution over a Gather of its S2 maps, so the
  graph holds 4 exact convolutions instead of 16 (``c3.in3`` [6, 3, 5, 5], ``c3.in4`` [6, 4, 5, 5],
  ``c3.in4_skip`` [3, 4, 5, 5], ``c3.in6`` [1, 6, 5, 5]);
* the output is ``y_i = sum_j (x_j - w_ij)^2``, a penalty (the class is the argmin), with fixed
  parameter vectors: ``output.centers`` [10, 84] is a buffer, not a trainable parameter. The paper
  draws them as stylized 7x12 bitmaps of the characters with values -1/+1; we use a seeded random
  -1/+1 code of the same size (a checkpoint may supply the real bitmaps under that name).

``lenet5_simplified`` is the common modern variant of textbooks and framework tutorials,
61,706 parameters (156 + 2,416 + 48,120 + 10,164 + 850): C3 fully connected to S2 (2,416),
S2/S4 plain average pools (no trainable coefficient or bias), plain tanh, and a fully
connected output layer (850) instead of the RBF units.

C5 is a convolution, as in the paper, so it yields 1x1 maps only on a 32x32 input; both
recipes accept only that size (F6 would otherwise change shape). Initializer names are the
paper's layer labels: ``c1.weight``, ``s2.bias``, ``c3.in4.weight``, ``f6.weight``.
"""

import numpy as np

from graphgen.builder import GraphBuilder, Tensor
from graphgen.errors import UnknownNameError
from graphgen.registry import register

_ACTIVATIONS = {"tanh": GraphBuilder.tanh, "relu": GraphBuilder.relu, "sigmoid": GraphBuilder.sigmoid}

# Table I: the S2 maps each C3 map combines, as (weight name, [S2 maps of each C3 map]) groups of
# equal fan-in; C3 maps are numbered in this order (0-5, 6-11, 12-14, 15). A map's inputs are
# listed in ascending S2 order, which is the order of its kernel's input slices.
C3_TABLE = (
    ("in3", [sorted((i + k) % 6 for k in range(3)) for i in range(6)]),
    ("in4", [sorted((i + k) % 6 for k in range(4)) for i in range(6)]),
    ("in4_skip", [[0, 1, 3, 4], [1, 2, 4, 5], [0, 2, 3, 5]]),
    ("in6", [[0, 1, 2, 3, 4, 5]]),
)
RBF_CODE_SEED = 1998  # the fixed RBF parameter vectors are the same for every builder seed


def squash(b: GraphBuilder, x: Tensor, name: str) -> Tensor:
    """The paper's sigmoid squashing f(a) = A tanh(S a), A = 1.7159, S = 2/3 (Appendix A)."""
    a = b.mul(x, np.float32(2.0 / 3.0), name=f"{name}_scale")
    return b.mul(b.tanh(a, name=f"{name}_tanh"), np.float32(1.7159), name=name)


def subsampling(b: GraphBuilder, x: Tensor, name: str) -> Tensor:
    """S2/S4: the sum of each 2x2 block times a trainable coefficient plus a trainable bias, per map."""
    summed = b.mul(b.avg_pool(x, 2, 2, name=f"{name}_pool"), np.float32(4.0), name=f"{name}_sum")
    return b.conv(summed, x.channels, 1, groups=x.channels, name=name)


def _gather_channels(b: GraphBuilder, x: Tensor, channels: list[int], name: str) -> Tensor:
    """x[:, channels] (the builder has no Gather op yet)."""
    idx = b.const(np.asarray(channels, np.int64), "indices")
    return b._emit("Gather", [x.name, idx], name, (x.shape[0], len(channels), *x.shape[2:]), axis=1)


def c3_sparse(b: GraphBuilder, x: Tensor, name: str = "c3") -> Tensor:
    """C3 with Table I's connections: one grouped 5x5 convolution per fan-in group, then concat."""
    maps = []
    with b.scope(name):
        for group, inputs in C3_TABLE:
            flat = [c for per_map in inputs for c in per_map]
            gathered = x if flat == list(range(x.channels)) else _gather_channels(b, x, flat, f"{group}_inputs")
            maps.append(b.conv(gathered, len(inputs), 5, groups=len(inputs), name=group))
    return b.concat(maps, axis=1, name=name)


def rbf_output(b: GraphBuilder, x: Tensor, num_classes: int, name: str = "output") -> Tensor:
    """Euclidean RBF units y_i = sum_j (x_j - w_ij)^2 with fixed -1/+1 parameter vectors (a buffer)."""
    n, features = x.shape
    code = np.random.default_rng(RBF_CODE_SEED).choice(np.float32([-1.0, 1.0]), size=(num_classes, features))
    with b.scope(name):
        centers = b.param("centers", (num_classes, features), code, buffer=True)
    centers_t = Tensor(centers, (num_classes, features), np.dtype(np.float32))
    diff = b.sub(b.reshape(x, [n, 1, features], name=f"{name}_unsqueeze"), centers_t, name=f"{name}_diff")
    sq = b.mul(diff, diff, name=f"{name}_square")
    axes = b.const(np.asarray([2], np.int64), "axes")
    return b._emit("ReduceSum", [sq.name, axes], name, (n, num_classes), keepdims=0)


@register("lenet5", family="lenet", source="paper: LeCun et al. 1998, Proc. IEEE, Fig. 2, Table I",
          input_size=(32, 32), in_channels=1, num_classes=10, test_input_size=(32, 32), fixed_input=True,
          aliases=("lenet",))
def lenet5(b: GraphBuilder, x: Tensor, num_classes: int = 10) -> Tensor:
    """The paper's LeNet-5: sparse C3, trainable S2/S4, RBF output (60,000 trainable parameters)."""
    x = squash(b, b.conv(x, 6, 5, name="c1"), "c1_act")
    x = squash(b, subsampling(b, x, "s2"), "s2_act")
    x = squash(b, c3_sparse(b, x, "c3"), "c3_act")
    x = squash(b, subsampling(b, x, "s4"), "s4_act")
    x = squash(b, b.conv(x, 120, 5, name="c5"), "c5_act")
    x = b.flatten(x, 1, name="flatten")
    x = squash(b, b.linear(x, 84, name="f6"), "f6_act")
    return rbf_output(b, x, num_classes, name="output")


@register("lenet5_simplified", family="lenet", source="paper: LeCun et al. 1998, common simplified variant",
          input_size=(32, 32), in_channels=1, num_classes=10, test_input_size=(32, 32), fixed_input=True)
def lenet5_simplified(b: GraphBuilder, x: Tensor, num_classes: int = 10, activation: str = "tanh") -> Tensor:
    """LeNet-5 as textbooks build it: full C3, average pools, Linear output (61,706 parameters)."""
    if activation not in _ACTIVATIONS:
        raise UnknownNameError(f"lenet5_simplified: activation {activation!r}; one of {', '.join(_ACTIVATIONS)}")
    act = _ACTIVATIONS[activation]
    x = act(b, b.conv(x, 6, 5, name="c1"), name="c1_act")
    x = b.avg_pool(x, 2, 2, name="s2")
    x = act(b, b.conv(x, 16, 5, name="c3"), name="c3_act")
    x = b.avg_pool(x, 2, 2, name="s4")
    x = act(b, b.conv(x, 120, 5, name="c5"), name="c5_act")
    x = b.flatten(x, 1, name="flatten")
    x = act(b, b.linear(x, 84, name="f6"), name="f6_act")
    return b.linear(x, num_classes, name="output")
