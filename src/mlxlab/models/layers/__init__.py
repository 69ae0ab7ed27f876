"""The building blocks the models are made of, whatever model holds them: attention with its KV
cache, MLPs, norms, masks and init (blocks.py), rotary positions (rope.py), an encoder's
unpadded rows (unpadding.py), gradient checkpointing of a model's blocks or recurrent mixers
(grad_checkpoint.py), and hybrids' sequence mixers: the gated delta rule (gated_delta.py,
gate_decay.py) and Mamba-2's scan (ssm_scan.py), with packed rows kept apart in them
(packed_rows.py). A layer here knows no model kind, adapter or
weight format; a new kind of layer (a chunked gated-delta layer for hybrid decoders) is a file
here."""
