"""Error types. The CLI maps UserError to exit code 2 and BuildError to exit code 1."""


class GraphgenError(Exception):
    """Base class of graphgen's own errors."""


class UserError(GraphgenError):
    """Bad input: unknown model or target, unreadable file, wrong option. Exit code 2."""


class UnknownNameError(UserError):
    """An unknown model, target or option value."""


class WeightsError(UserError):
    """A checkpoint with missing, unexpected or mis-shaped tensors, or an unreadable one."""


class ModelFileError(UserError):
    """An ONNX file that cannot be read or is not a valid model."""


class BuildError(GraphgenError):
    """The build ran but failed (compiler error, link error). Exit code 1."""


class VerificationError(BuildError):
    """Compiled outputs differ from onnxruntime beyond tolerance. Exit code 1."""


class PassEquivalenceError(BuildError):
    """An optimizer pass changed the model's outputs."""
