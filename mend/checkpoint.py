"""Editor checkpoints: `editor.safetensors` (tensors) + `editor.json` (config, targets, provenance).

Never pickle. Loading checks the checkpoint's targets against the model it is loaded for.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from mend.editor import EditorConfig, MendEditor
from mend.errors import CheckpointMismatchError, TargetResolutionError
from mend.models import files_hash
from mend.targets import EditTarget, resolve_targets

FORMAT_VERSION = 2  # 2: least-squares combination (λ, μ, C₀)


def save_editor(editor: MendEditor, out_dir: str | Path, model_type: str, extra: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in editor.state_dict().items()}
    tmp = out_dir / "editor.safetensors.tmp"
    save_file(state, tmp)
    tmp.replace(out_dir / "editor.safetensors")
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": model_type,
        "editor": editor.cfg.to_dict(),
        "targets": [t.to_dict() for t in editor.targets],
        **(extra or {}),
    }
    (out_dir / "editor.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def load_editor(path: str | Path, model) -> MendEditor:
    """Load an editor for `model`; raises CheckpointMismatchError if it was trained for other layers."""
    path = Path(path)
    meta_file, tensor_file = path / "editor.json", path / "editor.safetensors"
    if not meta_file.is_file() or not tensor_file.is_file():
        raise CheckpointMismatchError(
            f"no editor checkpoint at {path}: expected editor.json and editor.safetensors (train one with `mend train-editor`)"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(f"editor checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}")
    if meta["model_type"] != model.config.model_type:
        raise CheckpointMismatchError(
            f"editor at {path} was trained for a {meta['model_type']} model, not {model.config.model_type}"
        )
    saved = [EditTarget(**t) for t in meta["targets"]]
    try:
        actual = resolve_targets(model, patterns=[t.name.replace(".", r"\.") for t in saved])
    except TargetResolutionError as e:
        raise CheckpointMismatchError(f"editor at {path} edits layers this model lacks: {e}") from e
    if actual != saved:
        raise CheckpointMismatchError(
            f"editor at {path} expects targets {[(t.name, t.fan_in, t.fan_out) for t in saved]}, "
            f"the model has {[(t.name, t.fan_in, t.fan_out) for t in actual]}"
        )
    editor = MendEditor(saved, EditorConfig(**meta["editor"]))
    try:
        editor.load_state_dict(load_file(tensor_file))
    except (RuntimeError, OSError) as e:  # missing/extra/misshapen tensors, unreadable file
        raise CheckpointMismatchError(f"editor tensors at {tensor_file} do not match editor.json: {e}") from e
    device = next(model.parameters()).device
    return editor.to(device).eval()


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / "editor.json").read_text())


def editor_hash(path: str | Path) -> str:
    path = Path(path)
    return files_hash([path / "editor.json", path / "editor.safetensors"])
