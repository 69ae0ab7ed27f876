"""Real GGUF files for the source tests: a tiny Llama written by mlxlab's GGUF export (llama.cpp's
own `gguf` writer), and copies of a file with its header rewritten by the same package (what a
file edited by hand, or written by a broken converter, holds: a header that contradicts the
tensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DROP = object()  # a rewrite's value that removes the key


def tiny_llama_gguf(root: Path, quant: str = "q8_0") -> Path:
    """A tiny random Llama (transformers' weights, a ChatML byte-level BPE) as `root/tiny.gguf`."""
    from mlxlab.export.gguf import write_gguf
    from test_export_gguf import save_tiny

    save_tiny("llama", root / "llama")
    file = root / "tiny.gguf"
    write_gguf(root / "llama", file, quant, name="tiny")
    return file


def rewrite_gguf(src: Path, dst: Path, changes: dict[str, Any]) -> Path:
    """A copy of GGUF `src` at `dst` with header keys changed: {key: value} keeps the key's type
    (DROP removes it), `{key: (value, GGUFValueType)}` writes it with that type; new keys need
    the type. The tensors are copied as they are."""
    import gguf

    changes = dict(changes)
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = changes.pop(field.name, field.contents())
        if isinstance(value, tuple):
            value, kind = value
            sub = None
        if value is not DROP:
            writer.add_key_value(field.name, value, kind, sub_type=sub)
    for key, (value, kind) in changes.items():
        writer.add_key_value(key, value, kind)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return dst
