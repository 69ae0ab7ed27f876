"""`mlxlab export RUN --format gguf --adapters --out exported/ft.gguf`: a LoRA fine-tune for
llama.cpp, Ollama and LM Studio without re-quantizing what was trained. A LoRA update is about
the size of a 4-bit rounding step, so fusing it into the weights and quantizing the result
(`--format gguf` without --adapters) can round the fine-tune away; here the base and the
adapters stay apart, and llama.cpp adds the float adapters to the quantized base's output.

    exported/ft.base.gguf        the base, untouched pretrained weights (not fused), at --quant
    exported/ft.lora.gguf        the adapters as a GGUF LoRA adapter (gguf_lora.py), F32
    exported/ft.Modelfile        FROM ./ft.base.gguf + ADAPTER ./ft.lora.gguf (Ollama)
    exported/ft.llama-server.sh  llama-server -m ft.base.gguf --lora ft.lora.gguf

Where llama.cpp lays the architecture's tensors out otherwise (the hybrids' mixers, fused
projections split, experts stacked: gguf.py `Architecture.regroup`), the base is written from the
run's weights in transformers' layout and each adapter's pairs are its update through the base
export's layout, factored again (gguf_lora_regroup.py); adapters on routed experts are refused.

The base is named .base.gguf so that nobody loads it thinking it is the fine-tune. When the
run's base (model.pretrained) is itself a GGUF file, that file is the base: it is neither
copied nor rewritten (the adapters were trained on exactly its weights, and copying gigabytes
buys nothing), and the Modelfile and the script name it by its absolute path, so they work
where that file stays; --quant is refused then (nothing is quantized), and so is a file whose
sha256 is no longer the one the run's conversion of it recorded (the adapters fit the weights
they trained on). An `ollama:NAME` base is
the Ollama model itself: FROM NAME, and its blob for llama-server. Everything is written under
temporary names and renamed at the end: a refused or failed export leaves no file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mlxlab.export.gguf import GGUFExportError, write_gguf
from mlxlab.export.gguf_lora import FUSED, check_gguf_lora, write_gguf_lora
from mlxlab.export.llama_server import command_path, llama_server_script, write_script
from mlxlab.export.ollama import modelfile_path, write_modelfile
from mlxlab.export.retention import Reference, Retention, judge_export, record


def base_path(gguf_file: Path) -> Path:
    """Where the base is written beside the export: `ft.gguf` -> `ft.base.gguf`."""
    return gguf_file.with_name(f"{gguf_file.stem}.base.gguf")


def adapter_path(gguf_file: Path) -> Path:
    """The GGUF LoRA adapter beside the export: `ft.gguf` -> `ft.lora.gguf`."""
    return gguf_file.with_name(f"{gguf_file.stem}.lora.gguf")


def _gguf_base(pretrained: str | None) -> tuple[str, Path] | None:
    """(the Modelfile's FROM, the file llama-server loads) when the run's base is a GGUF file
    or an Ollama model, else None (a folder or hub id: the base is written here)."""
    from mlxlab.models.sources import OLLAMA_PREFIX, describe, resolve

    if not pretrained:
        return None
    kind = describe(pretrained)
    if kind == "gguf":
        file = Path(pretrained).expanduser().resolve()
        if not file.is_file():  # the run loads from its conversion; the Modelfile needs the file
            raise GGUFExportError(f"the run's base {pretrained} is not a file here: the "
                                  "Modelfile and llama-server name it, so export where it is "
                                  "(or export the run fused, without --adapters)")
        return str(file), file
    if kind == "ollama":
        return pretrained[len(OLLAMA_PREFIX):], Path(resolve(pretrained).provenance["blob"])
    return None


def _refusals(quant: str | None, seen: dict):
    """export_run's `refuse`: what has no GGUF adapter form, on the loaded run, before a file
    is written; `seen` gets the run's model.pretrained and its model_type."""
    from mlxlab.models.adapters.lora import AdapterLayer, has_adapters
    from mlxlab.models.adapters.routed_experts import expert_blocks
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    def refuse(model, state) -> None:
        if not has_adapters(model):
            raise GGUFExportError("--adapters needs a LoRA run (model.lora.rank > 0); this run "
                                  "has none: export it without --adapters")
        kinds = {m.kind for m in model.modules() if isinstance(m, AdapterLayer)}
        config = (model.hf_config or {}) if isinstance(model, MLXLMDecoder) else {
            "model_type": "llama"}  # a from-scratch run exports as a Llama
        check_gguf_lora(config, "dora" if "dora" in kinds else "lora")
        on_experts = next(iter(expert_blocks(model)), None)
        if on_experts is not None:
            raise GGUFExportError(f"the adapters on {on_experts.removeprefix('lm.')} reach the "
                                  "routed experts, which llama.cpp stacks into one 3-D tensor a "
                                  "projection (no matrix for a LoRA pair to land on): leave the "
                                  f"experts out of model.lora.targets, or {FUSED}")
        seen["model_type"] = config.get("model_type")  # mlx-lm's folder may name it otherwise
        model_cfg = state.config.get("model") or {}
        seen["pretrained"] = model_cfg.get("pretrained")
        given = _gguf_base(model_cfg.get("pretrained"))
        if given is not None:
            if model_cfg.get("quantize"):
                raise GGUFExportError(
                    f"this run re-quantized its GGUF base (model.quantize="
                    f"{model_cfg['quantize']}), so its adapters fit other weights than the "
                    f"file's: {FUSED}")
            if quant is not None:
                raise GGUFExportError(f"--quant {quant}: the base is the run's own GGUF file "
                                      f"({model_cfg['pretrained']}), used as it is; drop --quant")
            _same_file(given[1], state.base)  # last: it reads the whole file

    return refuse


def _same_file(file: Path, base: dict | None) -> None:
    """The GGUF file the Modelfile will name holds what the run trained on: its sha256 is the
    one its conversion recorded (source.json beside the converted folder the run loaded), else
    one line, since the adapters would land on other weights."""
    from mlxlab.runtime.files.checksum import file_sha256

    record = Path((base or {}).get("folder") or "") / "source.json"
    if not record.is_file():
        return  # no conversion on record: loading the run converted the file as it is now
    trained = json.loads(record.read_text()).get("sha256")
    if trained and file_sha256(file) != trained:
        raise GGUFExportError(f"{file} changed since the run trained on it (sha256 "
                              f"{trained[:16]}... then): its adapters fit the file as it was; "
                              "put that file back, or export the run fused (without --adapters)")


def export_gguf_adapters(run: str | Path, out: str | Path, quant: str | None = None,
                         overwrite: bool = False, retention: Retention | None = None) -> dict:
    """The run's base and its LoRA adapter as GGUF files beside `out` (module docstring), with
    an Ollama Modelfile and a llama-server script pairing them; returns the report (the run's
    export report with `base`, `adapter`, `modelfile`, `command`). `quant` (default f16) is the
    base's type when it is written here. A base written at another type than f32 changes the
    weights the adapters sit on: the pair is read back from the two files (the base dequantized
    from its .gguf, the adapter's update (alpha / rank) * B @ A added where llama.cpp adds it;
    gguf_readback.py) and judged against the run and its base (`retention`: its task files and
    --accept-loss; retention.py) before anything is moved into place."""
    from mlxlab.export.pipeline import run_export
    from mlxlab.export.request import ExportRequest

    run, out = Path(run).expanduser(), Path(out).expanduser()
    if out.suffix != ".gguf":
        raise GGUFExportError(f"--out {out}: name the export *.gguf (its files are named after "
                              "it: .base.gguf, .lora.gguf, .Modelfile, .llama-server.sh)")
    outputs = [base_path(out), adapter_path(out), modelfile_path(out), command_path(out)]
    for existing in outputs:
        if existing.exists() and not overwrite:
            raise GGUFExportError(f"{existing} exists: pick a new --out or pass --overwrite")
    request = _request(retention, quant)
    staging = Path(tempfile.mkdtemp(prefix="mlxlab-gguf-lora-"))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        # the base as trained (pretrained weights, a QLoRA base still packed) + mlx-lm adapters
        folder, seen = staging / "mlx-lm", {}
        exported = run_export(ExportRequest(
            run, folder, "mlx-lm", "float32", lora="adapters", refuse=_refusals(quant, seen),
            retention=request or Retention(), gguf_next=request is not None))
        report, reference = exported.report, exported.reference
        for key in ("adapter_path", "model_card", "dtype", "quantize"):  # the staging folder's
            report.pop(key, None)
        given = _gguf_base(seen["pretrained"])
        config, source = _base_source(folder, seen["model_type"],
                                      staging / "hf" if given is None else None)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if given is None:
            base = write_gguf(source, tmp / base_path(out).name, quant or "f16", name=run.name)
            base.update(gguf=str(base_path(out)), written=True)
            model_from, server_base = f"./{base_path(out).name}", base_path(out).name
        else:
            model_from, file = given
            base = {"gguf": str(file), "written": False, "bytes": file.stat().st_size}
            server_base = str(file)
        adapter = write_gguf_lora(folder / "adapters", config, tmp / adapter_path(out).name,
                                  name=run.name)
        adapter["gguf"] = str(adapter_path(out))
        if reference is not None and given is None:  # refused here: nothing is moved into place
            report["retention"] = _judge_pair((reference, request.accept_loss), tmp, out,
                                              source, staging / "read-back")
        elif request is not None and (request.tasks or request.accept_loss):
            raise GGUFExportError("--tasks and --accept-loss judge a base written here; this "
                                  "run's base is its own GGUF file, used as it is: drop them")
        ollama = write_modelfile(folder, tmp / out.name, base=model_from,
                                 adapter=adapter_path(out))
        write_script(tmp / command_path(out).name, _script(out, server_base))
        for file in outputs:  # all written: moved into place together
            if (tmp / file.name).exists():
                os.replace(tmp / file.name, file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    report.update(format="gguf", quant=(quant or "f16") if base["written"] else None, base=base,
                  adapter=adapter, modelfile=str(modelfile_path(out)),
                  chat_style=ollama["chat_style"], stop=ollama["stop"],
                  command=str(command_path(out)))
    if report.get("retention"):
        why = record(reference.state, out.name, report["retention"])
        report["retention"]["recorded"] = why or "on the run's MLflow run"
    return report


def _base_source(folder: Path, model_type: str, hf: Path | None) -> tuple[dict, Path]:
    """(the config the adapter is written for, the folder the base is written from): the
    mlx-lm `folder`'s own, or, for a family whose tensors llama.cpp lays out otherwise
    (gguf.py `Architecture.regroup`, which reads transformers' names), transformers' config and
    the base in transformers' layout, written at `hf` (gguf_lora_regroup.py; None: no base is
    written here, the run's GGUF file is the base)."""
    from mlxlab.export.gguf import architecture_of
    from mlxlab.export.gguf_lora_regroup import transformers_config, write_hf_base

    config = json.loads((folder / "config.json").read_text())
    hf_config = transformers_config(config, model_type)
    if architecture_of(hf_config).regroup is None:
        return config, folder
    return hf_config, folder if hf is None else write_hf_base(folder, hf_config, hf)


def _request(retention: Retention | None, quant: str | None) -> Retention | None:
    """The retention request for the pair: None at --quant f32 (the base written as trained,
    the adapter F32: nothing changes), where --tasks and --accept-loss are refused."""
    retention = retention or Retention()
    if quant == "f32":
        if retention.tasks or retention.accept_loss:
            raise GGUFExportError("--tasks and --accept-loss judge an export that changes the "
                                  "weights; --quant f32 writes the base as it trained: drop them")
        return None
    retention.check()
    return retention


def _judge_pair(against: tuple[Reference, bool], tmp: Path, out: Path, folder: Path,
                work: Path) -> dict:
    """The written base and adapter read back together and judged (retention.py) `against`
    the reference, a loss written only with accept_loss."""
    from mlxlab.export.gguf_readback import read_written_gguf

    reference, accept_loss = against
    try:
        exported = read_written_gguf(tmp / base_path(out).name, folder, work,
                                     lora=tmp / adapter_path(out).name)
    except ValueError as err:
        raise GGUFExportError(f"refused: the written base and adapter were not read back, so "
                              f"they cannot be judged ({err})") from None
    try:
        return judge_export(reference, accept_loss, exported, str(out),
                            "--quant q8_0 or f16 for the base")
    except ValueError as err:  # ExportError: the CLI's one line
        raise GGUFExportError(str(err)) from None


def _script(out: Path, base: str) -> str:
    adapter = adapter_path(out).name
    return llama_server_script(f"""
{Path(base).name} with the LoRA adapter {adapter}: llama.cpp adds the adapter's float update
to the base's output, so the base is not re-quantized with the fine-tune in it. Arguments go
on to llama-server (--port 8080; -ngl 99 puts the model on a GPU).
Ollama: `ollama create NAME -f {modelfile_path(out).name}` (FROM the base, ADAPTER {adapter}).
llama.cpp merges the pair into one file for tools that take no adapter (LM Studio):
llama-export-lora -m BASE --lora {adapter} -o merged.gguf""", ["-m", base, "--lora", adapter])
