"""Checkpoints as plain tensors: .npz or .safetensors with torchvision state_dict key names.

No torch needed: a torchvision checkpoint converted once (``np.savez(path, **{k: v.numpy()
for k, v in sd.items()})`` or ``safetensors.torch.save_file``) loads with ``--weights``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from graphgen.errors import WeightsError

FORMATS = (".npz", ".safetensors")


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {p} does not exist")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {k: np.asarray(z[k]) for k in z.files}
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(p)))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise WeightsError(f"cannot read weights file {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    except Exception as e:  # safetensors raises its own SafetensorError
        raise WeightsError(f"cannot read weights file {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    raise WeightsError(f"weights file {p} has an unsupported format {suffix or '(none)'}; accepted: .npz, .safetensors")


def save_weights(state_dict: dict[str, np.ndarray], path: str | Path) -> Path:
    p = Path(path)
    suffix = p.suffix.lower()
    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    if suffix == ".npz":
        # np.savez writes zip entries with the current time; write entries ourselves for byte-stable files
        with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_STORED) as zf:
            for k, v in tensors.items():
                info = zipfile.ZipInfo(k + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w") as f:
                    np.lib.format.write_array(f, v, allow_pickle=False)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(tensors, str(p))
    else:
        raise WeightsError(f"cannot save weights as {suffix or '(no suffix)'}; accepted: .npz, .safetensors")
    return p
