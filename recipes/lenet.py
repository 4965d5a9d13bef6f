"""LeNet-5 (LeCun, Bottou, Bengio and Haffner, 1998, "Gradient-Based Learning Applied to
Document Recognition", Proc. IEEE 86(11)), Section II.B and Figure 2.

The layers are the paper's C1-S2-C3-S4-C5-F6-output on a 1x32x32 image:

====== ============================== ===========
layer  paper                          output
====== ============================== ===========
C1     6 feature maps, 5x5 conv       6x28x28
S2     2x2 subsampling                6x14x14
C3     16 feature maps, 5x5 conv      16x10x10
S4     2x2 subsampling                16x5x5
C5     120 feature maps, 5x5 conv     120x1x1
F6     84 units, fully connected      84
output 10 classes                     10
====== ============================== ===========

We build the *common modern variant* (as in most textbooks and framework tutorials), not
the paper's exact one, and it has 61,706 parameters where the paper counts 60,000:

* C3 connects every S2 map to every C3 map (2,416 parameters) instead of the paper's
  Table I connection scheme (1,516);
* S2/S4 are plain 2x2/2 average pools, without the paper's trainable coefficient and bias
  per map (12 + 32 parameters);
* the squashing function is tanh, not the paper's scaled ``1.7159 tanh(2a/3)``;
* the output layer is a fully connected layer (850 parameters) instead of the paper's
  Euclidean RBF units with fixed, hand-designed parameters (which it does not count).

60,000 = 156 + 12 + 1,516 + 32 + 48,120 + 10,164 (paper, trainable);
61,706 = 156 + 2,416 + 48,120 + 10,164 + 850 (this variant).

C5 is a convolution, as in the paper, so it yields 1x1 maps only on a 32x32 input; the
recipe accepts only that size (F6 would otherwise change shape). Initializer names are
the paper's layer labels: ``c1.weight``, ``c3.bias``, ``f6.weight``, ``output.bias``.
"""

from graphgen.builder import GraphBuilder, Tensor
from graphgen.errors import UnknownNameError
from graphgen.registry import register

_ACTIVATIONS = {"tanh": GraphBuilder.tanh, "relu": GraphBuilder.relu, "sigmoid": GraphBuilder.sigmoid}


@register("lenet5", family="lenet", source="paper: LeCun et al. 1998, Proc. IEEE, Fig. 2",
          input_size=(32, 32), in_channels=1, num_classes=10, test_input_size=(32, 32), fixed_input=True,
          aliases=("lenet",))
def lenet5(b: GraphBuilder, x: Tensor, num_classes: int = 10, activation: str = "tanh") -> Tensor:
    """LeNet-5: C1-S2-C3-S4-C5-F6-output on 1x32x32 digits (61,706 parameters, common variant)."""
    if activation not in _ACTIVATIONS:
        raise UnknownNameError(f"lenet5: activation {activation!r}; one of {', '.join(_ACTIVATIONS)}")
    act = _ACTIVATIONS[activation]
    x = act(b, b.conv(x, 6, 5, name="c1"), name="c1_act")
    x = b.avg_pool(x, 2, 2, name="s2")
    x = act(b, b.conv(x, 16, 5, name="c3"), name="c3_act")
    x = b.avg_pool(x, 2, 2, name="s4")
    x = act(b, b.conv(x, 120, 5, name="c5"), name="c5_act")
    x = b.flatten(x, 1, name="flatten")
    x = act(b, b.linear(x, 84, name="f6"), name="f6_act")
    return b.linear(x, num_classes, name="output")
