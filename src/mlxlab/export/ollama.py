"""An Ollama Modelfile beside an exported GGUF, named after it (`chat.gguf` -> `chat.Modelfile`,
so several exports into one folder each keep their own): `ollama create NAME -f chat.Modelfile`
then runs it.

Ollama's TEMPLATE is a Go template, not Jinja, so a model's chat template cannot be translated in
general. The common styles can: the folder's template is rendered on a fixed probe chat and the
text compared with what each known style writes; a match gets that style's Go template, written
by hand below after Ollama's own library templates. No match: no TEMPLATE line, and a comment
says so (Ollama then falls back on the template the GGUF carries, `tokenizer.chat_template`,
for the templates it recognises). The stop tokens are the style's end of turn and the
tokenizer's end-of-sequence token.

A template that writes a system turn into a chat that has none (SmolLM2's and Qwen2.5's name
the assistant) trained the model on that turn; Ollama's Go templates only write the system
turn they are given, so that default text becomes the Modelfile's SYSTEM. It is read off the
template by rendering a chat without a system turn, and kept only if rendering the chat with it
as the system turn gives the same text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlxlab.data.chat import load_chat_template
from mlxlab.errors import ConfigError

PROBE = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "USR"},
         {"role": "assistant", "content": "ANS"}]

# style -> (what the Jinja template renders for PROBE (a substring test), Go template, stops)
STYLES: dict[str, tuple[str, str, list[str]]] = {
    "chatml": (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nUSR<|im_end|>\n"
        "<|im_start|>assistant\nANS<|im_end|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n",
        ["<|im_end|>"]),
    "llama3": (
        "<|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nUSR<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nANS<|eot_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|eot_id|>"]),
    "gemma": (
        "<start_of_turn>user\nSYS\n\nUSR<end_of_turn>\n<start_of_turn>model\nANS<end_of_turn>",
        # Gemma has no system turn: its template puts the system text before the first user
        # message (a Go template variable carries it there)
        "{{- $sys := \"\" }}{{- range .Messages }}{{- if eq .Role \"system\" }}"
        "{{ $sys = .Content }}{{- else if eq .Role \"user\" }}<start_of_turn>user\n"
        "{{ if $sys }}{{ $sys }}\n\n{{ $sys = \"\" }}{{ end }}{{ .Content }}<end_of_turn>\n"
        "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}"
        "<end_of_turn>\n{{ end }}{{- end }}<start_of_turn>model\n",
        ["<end_of_turn>"]),
    "phi3": (
        "<|system|>\nSYS<|end|>\n<|user|>\nUSR<|end|>\n<|assistant|>\nANS<|end|>",
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        ["<|end|>"]),
}


# style -> the system turn it writes, its text as the group (Gemma writes none of its own)
SYSTEM_TURNS = {
    "chatml": r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n",
    "llama3": r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
    "phi3": r"<\|system\|>\n(.*?)<\|end\|>\n",
}


def default_system(folder: Path, style: str | None) -> str | None:
    """The system text the folder's template writes into a chat that has no system turn, or
    None: read from a chat without one, and confirmed by rendering the chat with that text as its
    system turn (the same text both ways)."""
    if style not in SYSTEM_TURNS:
        return None
    template = load_chat_template(folder)
    chat = PROBE[1:]
    try:
        without = template.render(chat)
        found = re.search(SYSTEM_TURNS[style], without, flags=re.S)
        if found is None:
            return None
        text = found.group(1)
        same = template.render([{"role": "system", "content": text}, *chat]) == without
    except Exception:  # noqa: BLE001 - a template that cannot render a chat without system
        return None
    return text if same else None


def chat_style(folder: Path) -> str | None:
    """The known style the folder's chat template writes, or None (no template, or another)."""
    try:
        rendered = load_chat_template(folder).render(PROBE)
    except (ConfigError, Exception):  # noqa: BLE001 - a template that cannot render PROBE
        return None
    for name, (probe_text, _, _) in STYLES.items():
        if probe_text in rendered:
            return name
    return None


def _eos(folder: Path) -> str | None:
    file = folder / "tokenizer_config.json"
    if not file.is_file():
        return None
    token = json.loads(file.read_text()).get("eos_token")
    return token.get("content") if isinstance(token, dict) else token


def modelfile_path(gguf_file: Path) -> Path:
    """The Modelfile of `gguf_file`: beside it, named after it."""
    return gguf_file.with_name(f"{gguf_file.stem}.Modelfile")


def write_modelfile(folder: Path, gguf_file: Path, base: str | None = None,
                    adapter: Path | None = None) -> dict:
    """The Modelfile of `gguf_file` (modelfile_path; FROM the file by its name); returns the
    style and stops. With `adapter` (a GGUF LoRA adapter beside it): FROM `base` (a path or an
    Ollama model name) and ADAPTER the adapter by its name, as Ollama applies one."""
    style = chat_style(folder)
    stops: list[str] = list(STYLES[style][2]) if style else []
    eos = _eos(folder)
    if eos and eos not in stops:
        stops.append(eos)
    lines = [f"FROM {base or f'./{gguf_file.name}'}"]
    if adapter is not None:
        lines.append(f"ADAPTER ./{adapter.name}")
    lines.append("")
    system = default_system(folder, style)
    if style:
        lines += [f'TEMPLATE """{STYLES[style][1]}"""', ""]
    else:
        lines += ["# No TEMPLATE: the model's chat template is none of the styles mlxlab",
                  "# translates (ChatML, Llama 3, Gemma, Phi-3); Ollama reads the Jinja template",
                  "# the GGUF carries (tokenizer.chat_template) where it recognises it.", ""]
    if system is not None:  # what the template put into every training chat without one
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    path = modelfile_path(gguf_file)
    path.write_text("\n".join(lines) + "\n")
    return {"modelfile": str(path), "chat_style": style, "stop": stops, "system": system}
