"""Reference T3 decode timing, driven in chunks. Runs in the ORACLE venv (chatterbox-tts 0.1.7).

Started by benchmarks/t3_decode.py as a subprocess; talks JSON lines: stdin gets "go N" (run N more decode steps)
or "stop"; stdout gets one JSON object per message (first {"ready": ...} after loading and the prefill, then one per
chunk). Between chunks the reference sits blocked, so the parent can time its own implementations in between
(interleaved rounds: on a shared machine, every implementation sees the same machine state).

The reference's own loop (`T3.inference`: HF Llama with its dynamic cache, CFG batch of 2, HF logits processors,
multinomial, tqdm) runs unchanged; `T3HuggingfaceBackend.forward` is wrapped to time every backend call:
- forward_ms: one backend call (30 Llama layers + final norm + speech head: the model part of a step);
- step_ms: start of one decode forward to the start of the next = one whole token of the reference's loop
  (processors, multinomial, EOS check, embedding, forward, tqdm). Intervals that span a pause are not reported.
The stop-token logit is set to -1e9 in the wrapper (finite, so the CFG combine stays finite): random weights can
never end the run early.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

STOP_SPEECH = 6562


class Stop(Exception):
    """Raised inside the wrapped forward to leave T3.inference when the parent says "stop"."""


def text_ids(n: int) -> torch.Tensor:
    """Deterministic text ids (SOT + n ids + EOT), duplicated for the CFG batch: (2, n + 2). Same as t3_decode.py."""
    body = [(7 * i) % 600 + 1 for i in range(n)]
    ids = torch.tensor([[255] + body + [0]])
    return ids.expand(2, -1).contiguous()


def send(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--text-len", type=int, default=60)
    ap.add_argument("--max-steps", type=int, default=10_000, help="upper bound on decode steps (max_new_tokens)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    logging.disable(logging.WARNING)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)

    from safetensors.torch import load_file
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.inference import t3_hf_backend
    from chatterbox.tts import Conditionals

    t0 = time.perf_counter()
    t3 = T3()
    t3.load_state_dict(load_file(str(a.ckpt / "t3_cfg.safetensors")))
    t3.eval()
    cond = Conditionals.load(a.ckpt / "conds.pt").t3
    load_s = time.perf_counter() - t0

    chunk = {"forward_ms": [], "step_ms": [], "pos": []}
    st = {"calls": 0, "budget": 0, "last_start": None, "prefill_ms": None, "prefill_len": None}
    backend_forward = t3_hf_backend.T3HuggingfaceBackend.forward

    def wait_for_go() -> None:
        if st["prefill_ms"] is not None and st["calls"] > 1:
            send({"chunk": chunk})
        else:
            send({"ready": True, "prefill_ms": st["prefill_ms"], "prefill_len": st["prefill_len"], "load_s": load_s,
                  "torch_version": torch.__version__, "torch_threads": torch.get_num_threads()})
        for key in chunk:
            chunk[key] = []
        msg = sys.stdin.readline().split()
        if not msg or msg[0] == "stop":
            raise Stop
        st["budget"] = int(msg[1])
        st["last_start"] = None  # the interval across the pause is not a step

    def forward(self, inputs_embeds, *args, **kwargs):
        if st["calls"] >= 1:  # decode forwards: run in chunks
            if st["budget"] == 0:
                wait_for_go()
            st["budget"] -= 1
        start = time.perf_counter()
        if st["last_start"] is not None:
            chunk["step_ms"].append((start - st["last_start"]) * 1e3)
        out = backend_forward(self, inputs_embeds, *args, **kwargs)
        out.logits[..., STOP_SPEECH] = -1e9
        ms = (time.perf_counter() - start) * 1e3
        if st["calls"] == 0:
            st["prefill_ms"], st["prefill_len"] = ms, inputs_embeds.shape[1]
        else:
            chunk["forward_ms"].append(ms)
            chunk["pos"].append(st["prefill_len"] + st["calls"] - 1)  # absolute position of the fed token
        st["last_start"] = start
        st["calls"] += 1
        return out

    t3_hf_backend.T3HuggingfaceBackend.forward = forward
    try:
        torch.manual_seed(a.seed)
        t3.inference(t3_cond=cond, text_tokens=text_ids(a.text_len), max_new_tokens=a.max_steps,
                     temperature=0.8, cfg_weight=0.5, repetition_penalty=1.2, min_p=0.05, top_p=1.0)
        send({"error": "reference loop ended before the parent said stop (raise --max-steps)"})
    except Stop:
        send({"stopped": True, "decode_calls": st["calls"] - 1})
    finally:
        t3_hf_backend.T3HuggingfaceBackend.forward = backend_forward


if __name__ == "__main__":
    main()
