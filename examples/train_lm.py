"""Train a small decoder-only transformer LM in plain JAX + optax, with the fused loss or with optax.

    python examples/train_lm.py --smoke                          # CPU, tiny, both losses, seconds
    python examples/train_lm.py --loss cce --out train_cce.json  # GPU: the real run
    python examples/train_lm.py --loss optax --out train_optax.json
    python examples/train_lm.py --sweep-vocab 32768,65536,131072,262144 --out sweep.json
    python examples/train_lm.py --loss cce --save-states states.npz  # + a held batch's states
    python examples/plot_train.py --dir <folder with those JSON files>

Data: the Python standard library's own source files (`os.path.dirname(os.__file__)`, without
site-packages), in sorted path order, cut by a word-level tokenizer built here: the most frequent
words (identifiers, numbers, runs of spaces, single symbols) become tokens, everything else falls
back to its UTF-8 bytes. The tokenized corpus is cached under --cache-dir (default /tmp).

Loss (`--loss`), everything else identical (same init, same batches for the same seed):
    cce    jax_bindings.linear_cross_entropy(hidden (B, T, D), head (V, D), tokens, shift=True)
    optax  optax.softmax_cross_entropy_with_integer_labels on the materialized fp32 (B, T-1, V) logits
    both   the two in turn in one process, then the largest per-step gap (peak memory is per
           process, so the memory comparison needs separate runs)

Precision: fp32 master weights and Adam state; `--dtype bfloat16` (default) casts the weights to
bf16 for the forward, so activations, the hidden states and the classifier are bf16; both losses
accumulate in fp32.

`--save-states PATH` holds the corpus's last max(1, 4096 // seq) windows of seq tokens out of
training and, after the last step, saves their final hidden states (the LM head's input), the head
and the next-token targets: the `trained_lm` data of benchmarks/bench.py (format in save_states).
Training then draws its windows from the rest of the corpus only.

`--sweep-vocab` runs, for each vocabulary size and each loss, a few timed training steps in a fresh
process (so each peak memory is its own) and records peak memory, step time, or OOM. Vocabulary
sizes above the tokenizer's are padded with ids no token uses; below it, rarer words map to <unk>.

XLA_PYTHON_CLIENT_PREALLOCATE=false is set before jax is imported: JAX and CuPy share the GPU, and
`memory_stats()["peak_bytes_in_use"]` then reports what the step really used. The allocator's cap
(`bytes_limit`, default 75% of the GPU even without preallocation) is raised to 90% with
XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 unless it is set: the kernels need almost nothing from CuPy.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if not (os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION") or os.environ.get("XLA_CLIENT_MEM_FRACTION")):
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.90"  # the allocator's cap (default 0.75), CuPy needs little

import argparse  # noqa: E402
import collections  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from jax_bindings import linear_cross_entropy  # noqa: E402

# ------------------------------------------------------------------------------ settings
FULL = dict(
    steps=300,
    batch=16,
    seq=1024,
    d_model=1024,
    layers=8,
    heads=16,
    vocab=65536,
    dtype="bfloat16",
    corpus_mb=0.0,
    lr=6e-4,
    loss="cce",
)
SMOKE = dict(
    steps=20,
    batch=4,
    seq=32,
    d_model=32,
    layers=2,
    heads=2,
    vocab=512,
    dtype="float32",
    corpus_mb=0.25,
    lr=3e-3,
    loss="both",
)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", choices=("cce", "optax", "both"), help="default: cce (smoke: both)")
    ap.add_argument("--steps", type=int, help=f"training steps (default {FULL['steps']})")
    ap.add_argument("--batch", type=int, help=f"sequences per step (default {FULL['batch']})")
    ap.add_argument("--seq", type=int, help=f"tokens per sequence (default {FULL['seq']})")
    ap.add_argument("--d-model", type=int, help=f"width (default {FULL['d_model']})")
    ap.add_argument("--layers", type=int, help=f"transformer blocks (default {FULL['layers']})")
    ap.add_argument("--heads", type=int, help=f"attention heads (default {FULL['heads']})")
    ap.add_argument("--vocab", type=int, help=f"tokenizer vocabulary size (default {FULL['vocab']})")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="compute dtype (default bfloat16)")
    ap.add_argument(
        "--attention",
        choices=("xla", "cudnn"),
        default="xla",
        help="jax.nn.dot_product_attention implementation (cudnn: flash attention on NVIDIA GPUs)",
    )
    ap.add_argument("--lr", type=float, help=f"peak learning rate (default {FULL['lr']})")
    ap.add_argument(
        "--filter-eps",
        help='the cce loss with the certified gradient filter: "auto" or a float (default: exact)',
    )
    ap.add_argument("--corpus-mb", type=float, help="use only the first MB of the corpus (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="init and batch order")
    ap.add_argument("--out", help="JSON log (per-step loss and step time; the sweep's records)")
    ap.add_argument("--smoke", action="store_true", help="tiny everything, a few steps (CPU, CI)")
    ap.add_argument(
        "--save-states",
        metavar="PATH",
        help="hold a batch of ~4096 tokens out of training and save its final hidden states, the head "
        "and the targets as .npz (benchmarks/bench.py --trained-lm PATH); with --loss both, one file "
        "per loss (PATH's stem + _cce / _optax)",
    )
    ap.add_argument("--sweep-vocab", help="comma-separated vocabulary sizes, e.g. 32768,65536,131072,262144")
    ap.add_argument("--sweep-steps", type=int, default=6, help="steps per sweep point (the first is not timed)")
    ap.add_argument("--sweep-timeout", type=float, default=300.0, help="seconds per sweep point")
    ap.add_argument("--sweep-budget", type=float, help="start no sweep point after this many seconds")
    ap.add_argument("--resume", action="store_true", help="sweep: keep the points already in --out, run the rest")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "cce_cupy_train_lm"))
    ap.add_argument("--model-vocab", type=int, help=argparse.SUPPRESS)  # a sweep point's vocabulary
    ap.add_argument("--sweep-point", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    preset = dict(SMOKE if args.smoke else FULL)
    if args.sweep_vocab and not args.sweep_point:
        preset["loss"] = "both"  # a sweep compares the two unless --loss names one
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.d_model % args.heads:
        ap.error(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")
    if args.vocab < FIRST_WORD + 1:
        ap.error(f"--vocab must be at least {FIRST_WORD + 1}")
    if args.save_states and args.sweep_vocab:
        ap.error("--save-states saves a trained model's states: it does not go with --sweep-vocab")
    return args


# ------------------------------------------------------------------------------ corpus
TOKENIZER_VERSION = 3
TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+| +|\n|[^\sA-Za-z0-9_]|\s")
EOF_ID, UNK_ID, FIRST_WORD = 256, 257, 258  # ids 0..255 are the bytes


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's .py files in sorted order, without site-packages and caches."""
    root = Path(os.path.dirname(os.__file__))
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__"))
        files += [Path(d) / n for n in sorted(names) if n.endswith(".py")]
    return root, files


def _texts(files, max_bytes):
    used = 0
    for f in files:
        if max_bytes and used >= max_bytes:
            return
        text = f.read_text(encoding="utf-8", errors="replace")
        used += len(text)
        yield text


def build_vocab(files, vocab_size: int, max_bytes: int) -> list[str]:
    """Words by count (ties by the word), as many as fit after the 256 bytes and 2 specials."""
    counts = collections.Counter()
    for text in _texts(files, max_bytes):
        counts.update(TOKEN_RE.findall(text))
    words = [w for w in counts if len(w.encode()) > 1]  # single bytes already have their id
    words.sort(key=lambda w: (-counts[w], w))
    return words[: vocab_size - FIRST_WORD]


def encode(files, words: list[str], max_bytes: int) -> tuple[np.ndarray, int, int]:
    """(token ids, words seen, words spelled in bytes because they are not in the vocabulary)."""
    table = {w: FIRST_WORD + i for i, w in enumerate(words)}
    table.update({chr(b): b for b in range(128)})
    ids: list[int] = []
    seen = missed = 0
    for text in _texts(files, max_bytes):
        words_here = TOKEN_RE.findall(text)
        seen += len(words_here)
        for w in words_here:
            i = table.get(w)
            if i is None:
                missed += 1
                ids.extend(w.encode())
            else:
                ids.append(i)
        ids.append(EOF_ID)
    return np.asarray(ids, dtype=np.int32), seen, missed


def decode(ids, words: list[str]) -> str:
    """Text of token ids (the inverse of `encode`; <eof> becomes a form feed, <unk> U+FFFD)."""
    out, pending = [], bytearray()
    for i in (int(x) for x in ids):
        if i < 256:
            pending.append(i)
            continue
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
        out.append("\f" if i == EOF_ID else "\ufffd" if i == UNK_ID else words[i - FIRST_WORD])
    if pending:
        out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)


def load_corpus(vocab_size: int, corpus_mb: float, cache_dir: str, log=print) -> tuple[np.ndarray, dict]:
    """(tokens int32, meta): from the cache, or tokenized now and cached (written atomically)."""
    root, files = stdlib_files()
    max_bytes = int(corpus_mb * 2**20)
    sig = hashlib.sha1(
        repr(
            (
                TOKENIZER_VERSION,
                vocab_size,
                max_bytes,
                str(root),
                [(str(f.relative_to(root)), f.stat().st_size) for f in files],
            )
        ).encode()
    )
    stem = Path(cache_dir) / f"corpus-v{vocab_size}-{sig.hexdigest()[:12]}"
    if stem.with_suffix(".npy").exists() and stem.with_suffix(".json").exists():
        meta = json.loads(stem.with_suffix(".json").read_text())
        return np.load(stem.with_suffix(".npy")), meta
    t0 = time.perf_counter()
    log(f"tokenizing {len(files)} files under {root} (vocabulary {vocab_size}) ...")
    words = build_vocab(files, vocab_size, max_bytes)
    tokens, seen, missed = encode(files, words, max_bytes)
    meta = {
        "root": str(root),
        "python": platform.python_version(),
        "files": int((tokens == EOF_ID).sum()),
        "corpus_mb_limit": corpus_mb,
        "tokens": int(tokens.size),
        "vocab_built": FIRST_WORD + len(words),
        "word_coverage": 1 - missed / max(1, seen),
        "tokenize_s": time.perf_counter() - t0,
        "tokenizer": "word-level (identifiers, numbers, space runs, symbols) + UTF-8 byte fallback",
    }
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    payloads = {".npy": tokens, ".vocab.json": json.dumps(words).encode(), ".json": json.dumps(meta).encode()}
    for suffix, data in payloads.items():  # the meta file last: it marks the entry complete
        tmp = Path(f"{stem}{suffix}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            if isinstance(data, bytes):
                fh.write(data)
            else:
                np.save(fh, data)
        os.replace(tmp, f"{stem}{suffix}")
    log(
        f"  {tokens.size:,} tokens; {100 * meta['word_coverage']:.2f}% of the words are in the vocabulary, "
        f"the others are spelled in bytes; "
        f"{meta['tokenize_s']:.1f} s, cached at {stem}.npy"
    )
    return tokens, meta


HELD_TOKENS = 4096  # --save-states: about this many tokens of the corpus are held out


def hold_out(tokens: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(the corpus for training, the held batch (k, seq)): the last k = max(1, HELD_TOKENS // seq)
    windows of seq tokens, which no training window overlaps."""
    k = max(1, HELD_TOKENS // seq)
    if tokens.size <= (k + 1) * seq:
        raise ValueError(f"corpus of {tokens.size} tokens is too short to hold out {k} x {seq} tokens and train")
    return tokens[: -k * seq], tokens[-k * seq :].reshape(k, seq)


class Batches:
    """Random windows of `seq` tokens; the same seed gives the same batches."""

    def __init__(self, tokens: np.ndarray, batch: int, seq: int, seed: int):
        if tokens.size <= seq:
            raise ValueError(f"corpus of {tokens.size} tokens is shorter than --seq {seq}")
        self.tokens, self.batch, self.seq = tokens, batch, seq
        self.rng = np.random.default_rng(seed)

    def next(self) -> np.ndarray:
        starts = self.rng.integers(0, self.tokens.size - self.seq, self.batch)
        return self.tokens[starts[:, None] + np.arange(self.seq)]


# ------------------------------------------------------------------------------- model
DECAY = ("wte", "head", "wqkv", "wo", "w1", "w2")  # weight decay on matrices, not norms or positions


def init_params(key, vocab: int, d: int, layers: int, seq: int) -> dict:
    """fp32 master weights; block weights stacked on a leading layer axis (for lax.scan)."""
    k = jax.random.split(key, 7)
    std, out_std = 0.02, 0.02 / math.sqrt(2 * layers)

    def normal(key, shape, s):
        return s * jax.random.normal(key, shape, jnp.float32)

    return {
        "wte": normal(k[0], (vocab, d), std),
        "wpe": normal(k[1], (seq, d), 0.01),
        "blocks": {
            "ln1": jnp.ones((layers, d)),
            "wqkv": normal(k[2], (layers, d, 3 * d), std),
            "wo": normal(k[3], (layers, d, d), out_std),
            "ln2": jnp.ones((layers, d)),
            "w1": normal(k[4], (layers, d, 4 * d), std),
            "w2": normal(k[5], (layers, 4 * d, d), out_std),
        },
        "ln_f": jnp.ones((d,)),
        "head": normal(k[6], (vocab, d), std),  # the output embedding (V, D), not tied to wte
    }


def rms_norm(x, g):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * g.astype(jnp.float32)).astype(x.dtype)


def block(x, p, heads: int, attention: str):
    b, t, d = x.shape
    h = rms_norm(x, p["ln1"])
    q, k, v = jnp.split(h @ p["wqkv"], 3, axis=-1)
    q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attention).reshape(b, t, d)
    x = x + a @ p["wo"]
    h = rms_norm(x, p["ln2"])
    return x + jax.nn.gelu(h @ p["w1"]) @ p["w2"]


def hidden_states(params, tokens, heads: int, dtype, attention: str = "xla"):
    """(final hidden states (B, T, D), output embedding (V, D)), both in the compute dtype."""
    p = jax.tree_util.tree_map(lambda w: w.astype(dtype), params)
    x = p["wte"][tokens] + p["wpe"][: tokens.shape[1]]
    x, _ = jax.lax.scan(lambda x, blk: (block(x, blk, heads, attention), None), x, p["blocks"])
    return rms_norm(x, p["ln_f"]), p["head"]


def loss_cce(h, head, tokens, filter_eps=None):
    # Position t predicts tokens[:, t + 1]; the last position is ignored. Mean over B * (T - 1).
    return linear_cross_entropy(h, head, tokens, shift=True, filter_eps=filter_eps)


def loss_optax(h, head, tokens):
    logits = jnp.einsum("btd,vd->btv", h[:, :-1], head, preferred_element_type=jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


LOSSES = {"cce": loss_cce, "optax": loss_optax}


def filter_eps(args, loss_name: str):
    """--filter-eps for the cce loss ("auto" or a float), None otherwise."""
    eps = getattr(args, "filter_eps", None)
    if eps is None or loss_name != "cce":
        return None
    if eps == "auto":
        return eps
    try:
        return float(eps)
    except ValueError:
        raise SystemExit(f'--filter-eps must be "auto" or a number, got {eps!r}') from None


def make_optimizer(lr: float, steps: int, params):
    warmup = max(1, min(100, steps // 10))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr / 10)
    mask = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAY, params)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.1, mask=mask))


def make_step(loss_name: str, heads: int, dtype, opt, attention: str = "xla", filter_eps=None):
    loss_fn = LOSSES[loss_name]
    if filter_eps is not None:  # the certified filter (docs/design.md, "Certified filtering")
        loss_fn = functools.partial(loss_fn, filter_eps=filter_eps)

    def step(params, opt_state, tokens):
        def f(p):
            h, head = hidden_states(p, tokens, heads, dtype, attention)
            return loss_fn(h, head, tokens)

        loss, grads = jax.value_and_grad(f)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


# ---------------------------------------------------------------------------- training
def device_info() -> dict:
    d = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(d, "device_kind", str(d)),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
    }


def memory_stat(key: str):
    """`memory_stats()[key]` of the first device, None where the backend keeps no statistics (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    return None if not stats else stats.get(key)


def peak_bytes():
    return memory_stat("peak_bytes_in_use")


class Progress:
    """One stderr line: rewritten in place on a terminal, printed every ~5% otherwise."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.tty = total, label, sys.stderr.isatty()
        self.every = max(1, total // 20)

    def update(self, i: int, loss: float, tok_s: float, ms: float):
        line = f"[{self.label}] step {i}/{self.total}  loss {loss:.4f}  {tok_s:,.0f} tok/s  {ms:.1f} ms/step"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if i == self.total else ""))
        elif i % self.every == 0 or i == self.total or i == 1:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def fmt_bytes(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def xla_estimate(compiled) -> dict:
    """XLA's own compile-time accounting of one step: temp buffers and arguments + outputs - donated."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        m = None
    if m is None:
        return {"xla_temp_bytes": None, "xla_estimate_bytes": None}
    temp = int(m.temp_size_in_bytes)
    total = temp + int(m.argument_size_in_bytes) + int(m.output_size_in_bytes) - int(m.alias_size_in_bytes)
    return {"xla_temp_bytes": temp, "xla_estimate_bytes": total}


def train(
    args,
    loss_name: str,
    tokens: np.ndarray,
    model_vocab: int,
    quiet: bool = False,
    info: dict | None = None,
    final: dict | None = None,
) -> dict:
    """Compile, then run `args.steps` steps; returns the log record (per-step loss and time).

    `info` (if given) receives the compile time and XLA's memory estimate as soon as they are known,
    so a caller still has them when a step then fails (out of memory). `final` (if given) receives
    the trained parameters as "params"."""
    info = {} if info is None else info
    dtype = DTYPES[args.dtype]
    init = jax.jit(init_params, static_argnums=(1, 2, 3, 4))
    params = init(jax.random.key(args.seed), model_vocab, args.d_model, args.layers, args.seq)
    opt = make_optimizer(args.lr, args.steps, params)
    opt_state = opt.init(params)
    batches = Batches(tokens, args.batch, args.seq, args.seed + 1)
    first = jnp.asarray(batches.next())
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
        step = make_step(loss_name, args.heads, dtype, opt, args.attention, filter_eps(args, loss_name))
        compiled = step.lower(params, opt_state, first).compile()
    compile_s = time.perf_counter() - t0
    info.update(compile_s=compile_s, **xla_estimate(compiled))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    losses, step_ms = [], []
    bar = None if quiet else Progress(args.steps, loss_name)
    tok_per_step = args.batch * args.seq
    batch = first
    t_start = time.perf_counter()
    for i in range(1, args.steps + 1):
        t = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, batch)
        loss = float(loss)  # waits for the step
        dt = time.perf_counter() - t
        losses.append(loss)
        step_ms.append(1e3 * dt)
        if bar:
            bar.update(i, loss, tok_per_step / dt, 1e3 * dt)
        if i < args.steps:
            batch = jnp.asarray(batches.next())
    total_s = time.perf_counter() - t_start
    if final is not None:
        final["params"] = params
    timed = step_ms[1:] if len(step_ms) > 1 else step_ms  # the first step pays one-time costs
    med_ms = float(np.median(timed))
    return {
        "kind": "train",
        "loss_impl": loss_name,
        "filter_eps": filter_eps(args, loss_name),
        "config": {
            k: getattr(args, k)
            for k in (
                "steps",
                "batch",
                "seq",
                "d_model",
                "layers",
                "heads",
                "dtype",
                "lr",
                "seed",
                "smoke",
                "attention",
            )
        }
        | {"vocab": model_vocab},
        "env": device_info(),
        "params": int(n_params),
        "compile_s": compile_s,
        # The first step as a user waits for it: tracing (which loads the loss kernels), XLA's
        # compile, and the step itself.
        "first_step_s": compile_s + step_ms[0] / 1e3,
        "losses": losses,
        "step_ms": step_ms,
        "median_step_ms": med_ms,
        "tokens_per_s": tok_per_step / (med_ms / 1e3),
        "total_s": total_s,
        "final_loss": losses[-1],
        "final_loss_avg10": float(np.mean(losses[-10:])),
        "peak_bytes": peak_bytes(),
        "bytes_limit": memory_stat("bytes_limit"),
        "xla_temp_bytes": info["xla_temp_bytes"],
        "xla_estimate_bytes": info["xla_estimate_bytes"],
        "logits_bytes_fp32": args.batch * (args.seq - 1) * model_vocab * 4,
    }


def summary(rec: dict) -> str:
    c = rec["config"]
    return (
        f"[{rec['loss_impl']}] {c['steps']} steps of {c['batch']}x{c['seq']} tokens, V={c['vocab']}, "
        f"D={c['d_model']}, L={c['layers']}, {c['dtype']}, {rec['params'] / 1e6:.1f}M params on "
        f"{rec['env']['device']}: compile {rec['compile_s']:.1f} s, median step "
        f"{rec['median_step_ms']:.1f} ms, {rec['tokens_per_s']:,.0f} tok/s, final loss {rec['final_loss']:.4f} "
        f"(last-10 mean {rec['final_loss_avg10']:.4f}), peak memory {fmt_bytes(rec['peak_bytes'])} "
        f"(XLA's estimate {fmt_bytes(rec['xla_estimate_bytes'])}; fp32 logits alone would be "
        f"{fmt_bytes(rec['logits_bytes_fp32'])})"
    )


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def out_path(out: str | None, loss_name: str, both: bool):
    if not out or not both:
        return out
    p = Path(out)
    return str(p.with_name(f"{p.stem}_{loss_name}{p.suffix or '.json'}"))


def save_states(path, params, held: np.ndarray, args, loss_name: str) -> dict:
    """Write the held batch's final hidden states, the head and the targets to `path` (.npz);
    returns its metadata.

    Format (read by benchmarks/providers/problem.py, load_trained_lm): `e` (N, D) the hidden
    states of positions 0..T-2 of each held sequence, `c` (V, D) the head, both in the compute
    dtype, 16-bit ones stored losslessly as their uint16 bits; `targets` (N,) int32, the next
    tokens; `dtype` the name of e's and c's dtype; `meta` JSON: n, d, v, steps, loss_impl, loss
    (the mean cross-entropy of the held batch, by the training loss), seq, held_sequences, config.
    """
    dtype = DTYPES[args.dtype]

    def states(params, tokens):
        h, head = hidden_states(params, tokens, args.heads, dtype, args.attention)
        return h[:, :-1].reshape(-1, h.shape[-1]), head, LOSSES[loss_name](h, head, tokens)

    e, c, loss = jax.jit(states)(params, jnp.asarray(held))
    e, c = np.asarray(e), np.asarray(c)
    t = held[:, 1:].reshape(-1).astype(np.int32)
    meta = {
        "n": int(e.shape[0]),
        "d": int(e.shape[1]),
        "v": int(c.shape[0]),
        "steps": args.steps,
        "loss_impl": loss_name,
        "loss": float(loss),
        "seq": args.seq,
        "held_sequences": int(held.shape[0]),
        "held_out": "the corpus's last held_sequences x seq tokens, not trained on",
        "config": {k: getattr(args, k) for k in ("batch", "d_model", "layers", "heads", "lr", "seed", "attention")},
    }
    arrays = {
        "e": e.view(np.uint16) if e.dtype.itemsize == 2 else e,
        "c": c.view(np.uint16) if c.dtype.itemsize == 2 else c,
        "targets": t,
        "dtype": np.asarray(args.dtype),
        "meta": np.asarray(json.dumps(meta)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
        np.savez(fh, **arrays)
    os.replace(tmp, path)
    return meta


def run_training(args, tokens: np.ndarray, meta: dict) -> list[dict]:
    names = ("cce", "optax") if args.loss == "both" else (args.loss,)
    held = None
    if args.save_states:
        tokens, held = hold_out(tokens, args.seq)
    recs = []
    for name in names:
        params = {}
        rec = train(args, name, tokens, args.vocab, final=params)
        rec["corpus"] = meta
        print(summary(rec), flush=True)
        if held is not None:
            path = out_path(args.save_states, name, len(names) > 1)
            rec["states"] = {"path": str(path), **save_states(path, params["params"], held, args, name)}
            st = rec["states"]
            print(f"  states: {path} (N={st['n']}, D={st['d']}, V={st['v']}; held-out loss {st['loss']:.4f})")
        path = out_path(args.out, name, len(names) > 1)
        if path:
            write_json(path, rec)
            print(f"  log: {path}")
        recs.append(rec)
    if len(recs) == 2:
        gap = np.abs(np.subtract(recs[0]["losses"], recs[1]["losses"]))
        print(f"largest per-step |loss_cce - loss_optax| = {gap.max():.3g} at step {int(gap.argmax()) + 1}")
    return recs


# ------------------------------------------------------------------------------- sweep
def is_oom(exc: BaseException) -> bool:
    msg = f"{type(exc).__name__}: {exc}"
    return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower() or "OutOfMemory" in msg


def sweep_point(args, tokens: np.ndarray, meta: dict) -> dict:
    """One (vocabulary, loss) point, run in its own process; never raises."""
    v = args.model_vocab
    if v < meta["vocab_built"]:  # frequency-ordered vocabulary: the rarer words become <unk>
        tokens = np.where(tokens < v, tokens, UNK_ID).astype(np.int32)
    rec = {
        "kind": "sweep_point",
        "V": v,
        "loss_impl": args.loss,
        "vocab_built": meta["vocab_built"],
        "padded": v > meta["vocab_built"],
        "unk_mapped": v < meta["vocab_built"],
        "tokens_per_step": args.batch * args.seq,
        "env": device_info(),
    }
    info = {"compile_s": None, "xla_temp_bytes": None, "xla_estimate_bytes": None}
    try:
        r = train(args, args.loss, tokens, v, quiet=True, info=info)
        rec.update(
            status="ok",
            step_ms=r["median_step_ms"],
            step_ms_all=r["step_ms"],
            peak_bytes=r["peak_bytes"],
            bytes_limit=r["bytes_limit"],
            loss_last=r["final_loss"],
            **info,
        )
    except Exception as exc:  # every failure is recorded; OOM is the expected one
        rec.update(
            status="OOM" if is_oom(exc) else "error",
            peak_bytes=peak_bytes(),
            bytes_limit=memory_stat("bytes_limit"),
            message=f"{type(exc).__name__}: {str(exc)[:600]}",
            **info,
        )
    return rec


def run_sweep(args) -> list[dict]:
    sizes = [int(s) for s in args.sweep_vocab.split(",") if s.strip()]
    names = ("cce", "optax") if args.loss == "both" else (args.loss,)
    load_corpus(args.vocab, args.corpus_mb, args.cache_dir)  # tokenize once, before the children
    base = [sys.executable, str(Path(__file__).resolve()), "--sweep-point", "--steps", str(args.sweep_steps)]
    for k in ("batch", "seq", "d_model", "layers", "heads", "vocab", "dtype", "lr", "corpus_mb", "seed", "attention"):
        base += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    base += ["--cache-dir", args.cache_dir]
    out = {
        "kind": "sweep",
        "sizes": sizes,
        "losses": list(names),
        "config": {
            k: getattr(args, k)
            for k in (
                "batch",
                "seq",
                "d_model",
                "layers",
                "heads",
                "dtype",
                "vocab",
                "sweep_steps",
                "seed",
                "smoke",
                "attention",
            )
        },
        "note": f"tokenizer vocabulary {args.vocab}: larger sizes are padded with unused ids, smaller "
        "ones map the rarer words to <unk>; one fresh process per point",
        "points": [],
    }
    done: dict = {}
    if args.resume and args.out and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        if old.get("config") == out["config"]:
            done = {(p["V"], p["loss_impl"]): p for p in old["points"] if p["status"] in ("ok", "OOM")}
            print(f"resuming: {len(done)} points from {args.out}")
        else:
            print(f"not resuming: {args.out} was made with another configuration")
    print(out["note"])
    oom_at: dict[str, int] = {}
    t_sweep = time.perf_counter()
    for v in sizes:
        for name in names:
            if (v, name) in done:
                rec = done[(v, name)]
                out["points"].append(rec)
                if rec["status"] == "OOM":
                    oom_at.setdefault(name, v)
                continue
            if args.sweep_budget is not None and time.perf_counter() - t_sweep > args.sweep_budget:
                print(
                    f"  V={v:>7} {name:>5}: not run (--sweep-budget {args.sweep_budget:.0f} s spent; "
                    "--resume runs the rest)",
                    flush=True,
                )
                continue
            if name in oom_at:  # memory only grows with V: not run again
                rec = {
                    "kind": "sweep_point",
                    "V": v,
                    "loss_impl": name,
                    "status": "OOM",
                    "inferred": True,
                    "message": f"not run: already out of memory at V={oom_at[name]}",
                    "wall_s": 0.0,
                }
                out["points"].append(rec)
                print(f"  V={v:>7} {name:>5}: OOM (not run: out of memory at V={oom_at[name]} already)", flush=True)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                rec_path = Path(tmp) / "point.json"
                cmd = base + ["--model-vocab", str(v), "--loss", name, "--out", str(rec_path)]
                t0 = time.perf_counter()
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.sweep_timeout)
                    tail = (proc.stdout + proc.stderr)[-1500:]
                    if rec_path.exists():
                        rec = json.loads(rec_path.read_text())
                    else:  # died without a record (killed by the OS, a crash in XLA, ...)
                        oom = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
                        rec = {
                            "kind": "sweep_point",
                            "V": v,
                            "loss_impl": name,
                            "status": "OOM" if oom else "error",
                            "message": f"rc={proc.returncode}: {tail}",
                        }
                except subprocess.TimeoutExpired:
                    rec = {
                        "kind": "sweep_point",
                        "V": v,
                        "loss_impl": name,
                        "status": "timeout",
                        "message": f"no result within {args.sweep_timeout:.0f} s",
                    }
            rec["wall_s"] = time.perf_counter() - t0
            out["points"].append(rec)
            if rec["status"] == "OOM":
                oom_at[name] = v
            if rec["status"] == "ok":
                what = f"peak {fmt_bytes(rec['peak_bytes'])}, step {rec['step_ms']:.1f} ms"
            else:
                what = rec["status"] + (f" ({rec['message'][:200]})" if rec["status"] != "OOM" else "")
            print(f"  V={v:>7} {name:>5}: {what}  [{rec['wall_s']:.0f} s]", flush=True)
            if args.out:
                write_json(args.out, out)  # after every point: a cut-off run keeps what it has
    return out["points"]


# -------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep_point:
        tokens, meta = load_corpus(args.vocab, args.corpus_mb, args.cache_dir)
        rec = sweep_point(args, tokens, meta)
        write_json(args.out, rec)
        return 0
    if args.sweep_vocab:  # the parent leaves the GPU alone: each point runs in a fresh process
        run_sweep(args)
        return 0
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({device_info()['device']}); "
        f"XLA_PYTHON_CLIENT_PREALLOCATE={os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE')}, "
        f"allocator cap {fmt_bytes(memory_stat('bytes_limit'))}",
        flush=True,
    )
    tokens, meta = load_corpus(args.vocab, args.corpus_mb, args.cache_dir)
    print(
        f"corpus: {meta['files']} files of Python {meta['python']}'s standard library, {meta['tokens']:,} "
        f"tokens, vocabulary {meta['vocab_built']} ({100 * meta['word_coverage']:.2f}% word coverage)"
    )
    if args.vocab > meta["vocab_built"]:
        print(f"  the tokenizer found only {meta['vocab_built']} tokens: ids up to {args.vocab} are padding")
    run_training(args, tokens, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
