"""ShuffleNet V2 (torchvision) and ShuffleNet V1 (from the paper).

ShuffleNet V2: Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN
Architecture Design", ECCV 2018 (arXiv 1807.11164), Table 5, exactly as torchvision
defines it: initializer names are torchvision's state_dict keys (``stage2.0.branch1.0.weight``).
Its unit splits the channels in two halves (``x.chunk(2, dim=1)`` = one ONNX Split),
runs the right half through 1x1 -> depthwise 3x3 -> 1x1, concatenates and shuffles with
2 groups. The stride-2 unit runs both halves on the full input. The resulting
Concat -> channel shuffle -> Split chain between units is what an optimizer pass fuses,
so it is emitted exactly as exporters do (:meth:`GraphBuilder.channel_shuffle`:
Reshape -> Transpose(0, 2, 1, 3, 4) -> Reshape).

ShuffleNet V1: Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural
Network for Mobile Devices", CVPR 2018 (arXiv 1707.01083), Table 1 (stage layout and
output channels per group count g) and Table 2 (width scale factor s). The unit is the
paper's Fig. 2(b)/(c): grouped 1x1 conv + BN + ReLU -> channel shuffle -> depthwise 3x3
(stride 2 in the first unit of a stage) + BN -> grouped 1x1 + BN; stride 1 adds the
identity then ReLU, stride 2 concatenates a 3x3/2 average-pooled shortcut. The bottleneck
is 1/4 of the stage's output channels, and the very first 1x1 of stage 2 is not grouped
(its input has only 24 channels). Module layout and names follow the authors' repository
megvii-model/ShuffleNet-Series (ShuffleNetV1): ``first_conv``, ``maxpool``,
``features.N.branch_main_1`` / ``branch_main_2`` and a bias-free ``classifier.0``. One
difference: megvii shuffles after the depthwise BN instead of before the depthwise conv,
and reshapes the channels to (n, g) rather than the paper's (g, n) (the inverse
permutation; both send every group's channels to every group). The default follows the
paper; ``megvii_shuffle=True`` emits megvii's forward, so its checkpoints give its outputs.
"""

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

# ----------------------------------------------------------------------------- ShuffleNet V2
# (stages_repeats, stages_out_channels) of torchvision's builders: conv1, stage2-4, conv5.
SHUFFLENET_V2 = {
    "x0_5": ([4, 8, 4], [24, 48, 96, 192, 1024]),
    "x1_0": ([4, 8, 4], [24, 116, 232, 464, 1024]),
    "x1_5": ([4, 8, 4], [24, 176, 352, 704, 1024]),
    "x2_0": ([4, 8, 4], [24, 244, 488, 976, 2048]),
}


def conv_bn(b: GraphBuilder, x: Tensor, out_channels: int, kernel_size: int, stride: int, index: int,
            groups: int = 1, relu: bool = True) -> Tensor:
    """Bias-free conv at Sequential position ``index``, BN at ``index + 1``, optional ReLU after."""
    x = b.conv(x, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False, name=str(index))
    x = b.batch_norm(x, name=str(index + 1))
    return b.relu(x, name=str(index + 2)) if relu else x


def inverted_residual_v2(b: GraphBuilder, x: Tensor, out_channels: int, stride: int) -> Tensor:
    """ShuffleNet V2 unit (paper Fig. 3(c) stride 1, 3(d) stride 2)."""
    branch = out_channels // 2
    if stride == 1:
        if x.channels != 2 * branch:
            raise ValueError(f"stride-1 unit needs {2 * branch} input channels, got {x.channels}")
        left, right = b.split(x, [branch, branch], axis=1, name="chunk")
    else:
        left = right = x
        with b.scope("branch1"):
            left = conv_bn(b, left, x.channels, 3, stride, 0, groups=x.channels, relu=False)  # depthwise
            left = conv_bn(b, left, branch, 1, 1, 2)
    with b.scope("branch2"):
        right = conv_bn(b, right, branch, 1, 1, 0)
        right = conv_bn(b, right, branch, 3, stride, 3, groups=branch, relu=False)  # depthwise
        right = conv_bn(b, right, branch, 1, 1, 5)
    out = b.concat([left, right], axis=1, name="concat")
    return b.channel_shuffle(out, 2)


def shufflenet_v2(b: GraphBuilder, x: Tensor, stages_repeats, stages_out_channels, num_classes: int) -> Tensor:
    with b.scope("conv1"):
        x = conv_bn(b, x, stages_out_channels[0], 3, 2, 0)
    x = b.max_pool(x, 3, 2, 1, name="maxpool")
    for stage, (repeats, channels) in enumerate(zip(stages_repeats, stages_out_channels[1:-1]), start=2):
        for i in range(repeats):
            with b.scope(f"stage{stage}", i):
                x = inverted_residual_v2(b, x, channels, 2 if i == 0 else 1)
    with b.scope("conv5"):
        x = conv_bn(b, x, stages_out_channels[-1], 1, 1, 0)
    x = b.reduce_mean(x, [2, 3], keepdims=False, name="globalpool")  # torch: x.mean([2, 3])
    return b.linear(x, num_classes, name="fc")


def _register_v2(width: str, ref_params: int):
    repeats, channels = SHUFFLENET_V2[width]

    @register(f"shufflenet_v2_{width}", family="shufflenet", test_input_size=(32, 32))
    def build(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
        return shufflenet_v2(b, x, repeats, channels, num_classes)

    build.__name__ = f"shufflenet_v2_{width}"
    build.__doc__ = (f"ShuffleNet V2 {width.replace('x', '').replace('_', '.')}x (paper Table 5; "
                     f"{ref_params:,} parameters).")
    return build


shufflenet_v2_x0_5 = _register_v2("x0_5", 1366792)
shufflenet_v2_x1_0 = _register_v2("x1_0", 2278604)
shufflenet_v2_x1_5 = _register_v2("x1_5", 3503624)
shufflenet_v2_x2_0 = _register_v2("x2_0", 7393996)

# ----------------------------------------------------------------------------- ShuffleNet V1
#: Table 1: output channels of stages 2-4 at width 1x, by number of groups g.
SHUFFLENET_V1_CHANNELS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960),
                          4: (272, 544, 1088), 8: (384, 768, 1536)}
#: Table 1: units per stage (the first one has stride 2).
SHUFFLENET_V1_REPEATS = (4, 8, 4)
#: Table 2's width multipliers ("ShuffleNet s x") -> conv1 channels. The paper scales "the number
#: of filters"; megvii's table keeps 24 at 1.5x, which we follow (0.25x: 24/4).
SHUFFLENET_V1_STEM = {0.25: 6, 0.5: 12, 1.0: 24, 1.5: 24, 2.0: 48}


def _round_to(value: float, divisor: int) -> int:
    return max(divisor, int(value / divisor + 0.5) * divisor)


def shufflenet_v1_channels(groups: int, scale_factor: float) -> tuple[int, tuple[int, ...]]:
    """(conv1 channels, stage 2-4 channels) for ``groups`` and width ``scale_factor``.

    Stage widths are Table 1's times s, kept a multiple of 4g so the bottleneck (1/4) splits
    into g groups (every width in megvii's table already is). conv1 is SHUFFLENET_V1_STEM[s]
    rounded up to a multiple of g, which reproduces megvii's 12 (0.5x, g=3) and 16 (0.5x, g=8).
    """
    if groups not in SHUFFLENET_V1_CHANNELS:
        raise ValueError(f"groups must be one of {sorted(SHUFFLENET_V1_CHANNELS)}, got {groups}")
    if scale_factor not in SHUFFLENET_V1_STEM:
        raise ValueError(f"scale_factor must be one of {tuple(SHUFFLENET_V1_STEM)}, got {scale_factor}")
    stages = tuple(_round_to(c * scale_factor, 4 * groups) for c in SHUFFLENET_V1_CHANNELS[groups])
    stem = -(-SHUFFLENET_V1_STEM[scale_factor] // groups) * groups
    return stem, stages


def shuffle_unit_v1(b: GraphBuilder, x: Tensor, out_channels: int, stride: int, groups: int,
                    first_group: bool, megvii_shuffle: bool) -> Tensor:
    """ShuffleNet V1 unit (paper Fig. 2(b) stride 1, 2(c) stride 2)."""
    mid = out_channels // 4
    # stride 2 concatenates the pooled input, so the main branch makes only the remaining channels
    branch_out = out_channels - x.channels if stride == 2 else out_channels
    with b.scope("branch_main_1"):
        y = conv_bn(b, x, mid, 1, 1, 0, groups=1 if first_group else groups)
        if groups > 1 and not megvii_shuffle:
            y = b.channel_shuffle(y, groups)  # paper: reshape to (g, n), transpose, flatten
        y = conv_bn(b, y, mid, 3, stride, 3, groups=mid, relu=False)  # depthwise
    if groups > 1 and megvii_shuffle:
        # megvii reshapes to (n, g) instead: the inverse permutation, i.e. a shuffle with n groups
        y = b.channel_shuffle(y, mid // groups)
    with b.scope("branch_main_2"):
        y = conv_bn(b, y, branch_out, 1, 1, 0, groups=groups, relu=False)
    if stride == 1:
        return b.relu(b.add(y, x, name="add"), name="relu")
    shortcut = b.avg_pool(x, 3, 2, 1, name="branch_proj")  # count_include_pad, as nn.AvgPool2d
    return b.concat([shortcut, b.relu(y, name="relu")], axis=1, name="concat")


def shufflenet_v1(b: GraphBuilder, x: Tensor, groups: int, num_classes: int, scale_factor: float,
                  megvii_shuffle: bool) -> Tensor:
    stem, stages = shufflenet_v1_channels(groups, scale_factor)
    with b.scope("first_conv"):
        x = conv_bn(b, x, stem, 3, 2, 0)
    x = b.max_pool(x, 3, 2, 1, name="maxpool")
    index = 0
    for stage, (repeats, channels) in enumerate(zip(SHUFFLENET_V1_REPEATS, stages)):
        for i in range(repeats):
            with b.scope("features", index):
                x = shuffle_unit_v1(b, x, channels, 2 if i == 0 else 1, groups,
                                    first_group=(stage == 0 and i == 0),
                                    megvii_shuffle=megvii_shuffle)
            index += 1
    # megvii uses AvgPool2d(7) (224 input only); a global pool is the same there and works at any size
    x = b.flatten(b.global_avg_pool(x, name="globalpool"), 1, name="flatten")
    with b.scope("classifier"):
        return b.linear(x, num_classes, bias=False, name="0")


def _register_v1(groups: int, name: str, aliases=()):
    @register(name, family="shufflenet", source="paper: Zhang et al. 2017 (ShuffleNet) Table 1",
              test_input_size=(32, 32), aliases=aliases)
    def build(b: GraphBuilder, x: Tensor, num_classes: int = 1000, scale_factor: float = 1.0,
              megvii_shuffle: bool = False) -> Tensor:
        return shufflenet_v1(b, x, groups, num_classes, scale_factor, megvii_shuffle)

    build.__name__ = name
    build.__doc__ = f"ShuffleNet V1 with {groups} group{'s' if groups > 1 else ''} (paper Table 1, width 1x)."
    return build


shufflenet_v1_model = _register_v1(3, "shufflenet_v1", aliases=("shufflenet_v1_g3",))
shufflenet_v1_model.__doc__ = "ShuffleNet V1 1.0x, g=3 (paper Table 1: 1.86M parameters, 137M multiply-adds at 224)."
shufflenet_v1_g1 = _register_v1(1, "shufflenet_v1_g1")
shufflenet_v1_g2 = _register_v1(2, "shufflenet_v1_g2")
shufflenet_v1_g4 = _register_v1(4, "shufflenet_v1_g4")
shufflenet_v1_g8 = _register_v1(8, "shufflenet_v1_g8")
