"""LoRA on many processes with torch.distributed: DDP, FSDP2 and accelerate, started by torchrun.

``python -m lora_ref.distributed --strategy ddp --nproc 2 --steps 20 --seed 0 --json run.json``
fine-tunes the shipped tiny Llama on the date task and writes what moved between the processes:

    strategy    what each process holds                         what crosses the wire per step
    single      one process, the whole model                    nothing
    ddp         a full replica, LoRA trainable                  all-reduce of the LoRA gradients
    full-ddp    a full replica, every parameter trainable       all-reduce of every gradient
    fsdp        1/W of every parameter (FSDP2 ``fully_shard``)  all-gather of every parameter,
                and 1/W of Adam's state                         reduce-scatter of the LoRA gradients
    accelerate  ``ddp`` through accelerate's ``Accelerator``    as ddp

Every strategy sees the same GLOBAL batch of ``--batch-size`` pairs at each step: rank i of W
takes rows [i G/W, (i + 1) G/W). Every answer of the date task has the same number of tokens, so
the mean of the W local mean losses is the global mean loss, and DDP's average of the W local
gradients is the gradient of the global batch (eq-ch12-ddp-mean): a correct run follows the
1-process run up to the order of floating-point sums.

The counts are measured, not computed: a DDP communication hook adds up the bytes of every
bucket it all-reduces, and FSDP2's ``set_custom_all_gather`` / ``set_custom_reduce_scatter``
hooks add up the bytes of every collective FSDP issues. ``--nproc 1`` runs in-process (a
world-size-1 group on an in-memory store for ddp and fsdp); ``--nproc N > 1`` launches
``torchrun --standalone --nproc_per_node N`` (a free port, no fixed address) with a 60 s
process-group timeout, so a failing run ends instead of hanging. ``--backend nccl`` with N GPUs
is the same command on a GPU node (``torchrun_command`` writes the multi-node form).

Book: sec-ch12-contract (notebooks/12_distributed).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = ("single", "ddp", "full-ddp", "fsdp", "accelerate")
BACKENDS = ("gloo", "nccl")
PG_TIMEOUT_S = 60           # process-group timeout: a lost peer fails a collective after this, not 30 min
DEFAULTS = dict(steps=20, seed=0, r=8, alpha=16.0, batch_size=32, lr=None, targets="all-linear")

__all__ = ["STRATEGIES", "BACKENDS", "PG_TIMEOUT_S", "torchrun_command", "run", "ddp_probe", "main"]


# ----------------------------------------------------------------------------- the command


def _check_args(strategy, nproc, steps, batch_size, backend, r):
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={strategy!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    for name, value in (("nproc", nproc), ("steps", steps), ("batch_size", batch_size), ("r", r)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    if strategy == "single" and nproc != 1:
        raise ValueError(f"strategy 'single' is one process, got nproc={nproc}; use ddp or fsdp for more")
    if batch_size % nproc:
        raise ValueError(f"the global batch of batch_size={batch_size} pairs must split evenly over "
                         f"nproc={nproc} processes (batch_size % nproc = {batch_size % nproc})")


def _worker_args(strategy, steps, seed, json_path, backend, r, alpha, batch_size, lr, targets):
    args = ["--strategy", strategy, "--steps", str(steps), "--seed", str(seed), "--json", str(json_path),
            "--backend", backend, "--lora-r", str(r), "--lora-alpha", repr(float(alpha)), "--batch-size", str(batch_size),
            "--targets", targets]
    return args + ([] if lr is None else ["--lr", repr(float(lr))])


def torchrun_command(strategy, nproc, *, steps=20, seed=0, json_path="run.json", backend="gloo", nnodes=1,
                     rdzv_endpoint=None, r=8, alpha=16.0, batch_size=32, lr=None, targets="all-linear"):
    """The torchrun command line (a list of strings) that trains with ``strategy`` on ``nproc``
    processes per node, each running this module's worker.

    nnodes=1: ``torchrun --standalone --nproc_per_node N``: a rendezvous on localhost at a free
    port. nnodes > 1: the same command on every node, with ``--nnodes M --rdzv-backend c10d
    --rdzv-endpoint HOST:PORT`` (HOST: a node every node can reach; rdzv_endpoint is required).
    Set ``--backend nccl`` for GPUs; each process then uses GPU LOCAL_RANK.
    """
    _check_args(strategy, nproc * nnodes, steps, batch_size, backend, r)
    cmd = ["torchrun"]
    if nnodes == 1:
        cmd += ["--standalone", "--nproc_per_node", str(nproc)]
    else:
        if not rdzv_endpoint:
            raise ValueError(f"nnodes={nnodes} needs rdzv_endpoint='HOST:PORT', a node that all nodes reach")
        cmd += ["--nnodes", str(nnodes), "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", "lora-ch12"]
    return cmd + ["-m", "lora_ref.distributed", "--worker"] + _worker_args(
        strategy, steps, seed, json_path, backend, r, alpha, batch_size, lr, targets)


def run(strategy, nproc=1, *, steps=20, seed=0, backend="gloo", r=8, alpha=16.0, batch_size=32, lr=None,
        targets="all-linear", json_path=None, timeout=120):
    """Train with ``strategy`` on ``nproc`` processes and return rank 0's record (a dict).

    nproc = 1 runs in this process; nproc > 1 starts torchrun in a subprocess (its own session,
    killed whole after ``timeout`` seconds). The record is also written to ``json_path`` if given,
    in one piece (a temporary file renamed into place). Raises RuntimeError with the workers'
    last output if torchrun fails.
    """
    _check_args(strategy, nproc, steps, batch_size, backend, r)
    params = dict(steps=steps, seed=seed, backend=backend, r=r, alpha=alpha, batch_size=batch_size, lr=lr,
                  targets=targets)
    if nproc == 1:
        record = _train(strategy, rank=0, world_size=1, local_rank=0, **params)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "record.json"
            cmd = [sys.executable, "-m", "torch.distributed.run"] + torchrun_command(
                strategy, nproc, json_path=out, **params)[1:]
            _launch(cmd, timeout, nproc)
            record = json.loads(out.read_text())
    if json_path is not None:
        _write_json(record, json_path)
    return record


def _launch(cmd, timeout, nproc):
    env = dict(os.environ)
    # the machine's cores shared out, one share per rank: N ranks of the parent's thread count each would
    # oversubscribe the cores, and spinning OpenMP threads then slow every collective tenfold
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env["LORA_BOOK_QUIET"] = "1"
    # The output goes to a file, not a pipe: the workers inherit it, and a reader of a pipe would wait
    # for the last of them to close it, a hung one included.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            log.seek(0)
            raise RuntimeError(f"torchrun did not finish within {timeout} s and was killed: {shlex.join(cmd)}\n"
                               f"last output:\n{_tail(log.read())}") from None
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed with exit code {proc.returncode}: {shlex.join(cmd)}\n"
                           f"last output:\n{_tail(output)}")


def _stop(proc, grace_s=10):
    """End torchrun and every worker. torchrun starts each worker in a session of its own, so killing
    torchrun's process group would leave them running: SIGTERM first (torchrun then stops its workers),
    then SIGKILL to every process that was a descendant when the limit passed."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    if proc.poll() is None:
        proc.kill()
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=grace_s)


def _tail(text, lines=20):
    """The end of the first failing worker's traceback ('[rank0]: ...' lines), else the end of the output."""
    out = (text or "").strip().splitlines()
    for prefix in sorted({line.split(":", 1)[0] for line in out if line.startswith("[rank")}):
        return "\n".join([line for line in out if line.startswith(prefix + ":")][-lines:])
    return "\n".join(out[-lines:])


def _write_json(record, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- counting


class _Counter:
    """Bytes per kind of collective, and the calls per step (to see that every step is the same)."""

    def __init__(self):
        self.bytes = {}
        self.buckets = None           # DDP: [(numel, [parameter names])] of the first step's buckets

    def add(self, kind, tensor):
        self.bytes[kind] = self.bytes.get(kind, 0) + tensor.numel() * tensor.element_size()


def _ddp_counting_hook(counter, names):
    """A DDP comm hook: count the bucket's bytes, then all-reduce it as DDP's default does."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state, bucket):
        buf = bucket.buffer()                                   # the flat gradients of one bucket
        counter.add("all_reduce", buf)
        if bucket.index() == 0:                                 # a new step: keep only its buckets
            counter.buckets = []
        counter.buckets.append((buf.numel(), [names[id(p)] for p in bucket.parameters()]))
        return default_hooks.allreduce_hook(None, bucket)

    counter.buckets = []
    return hook


def _fsdp_counting_comms(counter):
    """FSDP2 all-gather and reduce-scatter objects that count bytes and do what the defaults do."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class CountingAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            counter.add("all_gather", output_tensor)             # the unsharded result on this rank
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            counter.add("reduce_scatter", input_tensor)          # the unsharded gradients it reduces
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountingAllGather(), CountingReduceScatter()


def ddp_probe(model, batch, steps=2, find_unused_parameters=False):
    """Wrap a copy of ``model`` in DDP in this process (a world of one, on an in-memory store: no port)
    and run ``steps`` forward and backward passes on ``batch``; report what DDP did:

        {"bytes_per_step": [bytes all-reduced at each step], "bucketed_params": numbers in DDP's buckets,
         "trainable_params": numbers with requires_grad, "error": the first line of DDP's error, or None}

    With find_unused_parameters=False, a trainable parameter that gets no gradient (an inactive
    adapter left trainable, PEFT #899; a LoRA layer whose output the loss never uses, PEFT #951) stops
    the second step with "Expected to have finished reduction in the prior iteration". With True, DDP
    walks the graph after every forward and all-reduces the unused parameters' (zero) gradients too.
    """
    import copy

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    _check_args("single", 1, steps, 1, "gloo", 1)
    if dist.is_initialized():
        raise RuntimeError("ddp_probe starts its own one-process group; a process group is already initialized")
    model = copy.deepcopy(model)
    names = {id(p): n for n, p in model.named_parameters()}
    counter = _Counter()
    out = dict(bytes_per_step=[], bucketed_params=0,
               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad), error=None)
    _init_group("gloo", 0, 1)
    ddp = None
    try:
        ddp = DDP(model, find_unused_parameters=find_unused_parameters)
        ddp.register_comm_hook(None, _ddp_counting_hook(counter, names))
        for _ in range(steps):
            ddp(**batch).loss.backward()
            out["bytes_per_step"].append(counter.bytes.pop("all_reduce", 0))
        out["bucketed_params"] = sum(n for n, _ in counter.buckets)
    except RuntimeError as e:
        out["error"] = str(e).strip().splitlines()[0]
    finally:
        del ddp, model                      # the wrapped copy and its hooks
        _release_then_destroy_group()
    return out


# ----------------------------------------------------------------------------- the worker


def _shard_collate(rank, world_size, device):
    """Collate a global batch into rank's contiguous share, after checking that every share
    carries the same number of answer tokens (else the mean of local means is not the global mean)."""
    from .tiny.data import make_batch

    def collate(pairs):
        per = len(pairs) // world_size
        tokens = [len((a + "\n").encode("utf-8")) for _, a in pairs]
        shares = [sum(tokens[i * per:(i + 1) * per]) for i in range(world_size)]
        if len(set(shares)) != 1:
            raise ValueError(f"the {world_size} shares of the global batch carry {shares} answer tokens; "
                             f"equal counts are needed for the mean of local losses to be the global mean")
        batch = make_batch(pairs[rank * per:(rank + 1) * per])
        return {k: v.to(device) for k, v in batch.items()}

    return collate


def _init_group(backend, rank, world_size):
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=PG_TIMEOUT_S)
    if world_size == 1 and "MASTER_ADDR" not in os.environ:        # in-process: no port, no peer
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)


def _train(strategy, *, rank, world_size, local_rank, steps, seed, backend, r, alpha, batch_size, lr, targets):
    import torch
    import torch.distributed as dist

    from . import torch as lt
    from .tiny.data import example_batches, task_examples
    from .tiny.model import load_tiny_llama
    from .tiny.runs import RECIPE
    from .tiny.training import adamw, train_steps

    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    distributed = strategy != "single"
    accelerator = None
    if strategy == "accelerate":
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        accelerator = Accelerator(cpu=backend == "gloo", kwargs_handlers=[
            InitProcessGroupKwargs(backend=backend, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))])
    elif distributed:
        _init_group(backend, rank, world_size)

    model = load_tiny_llama().to(device)
    total_params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(seed)                                       # the same A on every rank
    if strategy == "full-ddp":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        lt.add_lora(model, targets, r=r, alpha=alpha)
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lr = (RECIPE.full_lr if strategy == "full-ddp" else RECIPE.lora_lr) if lr is None else lr

    counter = _Counter()
    make_optimizer = adamw(lr)
    if strategy in ("ddp", "full-ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local_rank] if backend == "nccl" else None)
        model.register_comm_hook(None, _ddp_counting_hook(counter, names))
    elif strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size,))
        gather, scatter = _fsdp_counting_comms(counter)
        for layer in model.model.layers:                          # one unit per decoder layer, then the rest
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for module in [*model.model.layers, model]:
            module.set_custom_all_gather(gather)
            module.set_custom_reduce_scatter(scatter)
    elif strategy == "accelerate":
        model, prepared = accelerator.prepare(model, make_optimizer(model))
        if world_size > 1:
            model.register_comm_hook(None, _ddp_counting_hook(counter, names))
        make_optimizer = lambda _model: prepared                # the optimizer prepared above

    examples = task_examples("train", RECIPE.n_train, seed=0)
    batches = example_batches(examples, batch_size, seed, collate=_shard_collate(rank, world_size, device))
    per_step, stamps = [], [time.perf_counter()]

    def after_step(step, _model):
        per_step.append(dict(counter.bytes))
        counter.bytes.clear()
        stamps.append(time.perf_counter())

    made = []                                                     # the optimizer train_steps builds

    def optimizer(m):
        made.append(make_optimizer(m))
        return made[-1]

    result = train_steps(model, batches, steps, optimizer=optimizer, warmup=min(10, steps), after_step=after_step)
    opt = made[0]
    record = _record(strategy, model, result, per_step, stamps, counter, total_params, n_trainable, trainable,
                     world_size, backend, opt, accelerator, dict(steps=steps, seed=seed, r=r, alpha=alpha,
                     batch_size=batch_size, lr=lr, targets=targets))
    if distributed and dist.is_initialized():
        del model, made, opt, optimizer, result, accelerator
        _release_then_destroy_group()
    return record


def _release_then_destroy_group():
    """Destroy the process group after everything that used it is gone. A DDP reducer (or an FSDP
    state) that outlives its group is freed by some later garbage collection, at whatever line of the
    caller's program that happens to run, and its destructor can block there for good (measured with
    the old order: 2 hangs in 2 runs of 80 rounds of 4 ``ddp_probe`` calls, none with this one).
    Collecting first frees them while the group still exists."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _record(strategy, model, result, per_step, stamps, counter, total_params, n_trainable, trainable, world_size,
            backend, opt, accelerator, config):
    import torch
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    losses = torch.tensor(result["losses"], dtype=torch.float64)
    state = sum(_local(v).numel() for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(params, key=_bare):
        p = params[name]
        if p.requires_grad:
            full = _full(p.detach()).float().cpu().contiguous()          # FSDP: gathered from the shards
            digest.update(_bare(name).encode() + full.numpy().tobytes())
    adapter_sha = digest.hexdigest()
    norm = math.sqrt(sum(float(_full(p.detach()).double().square().sum()) for p in params.values() if p.requires_grad))
    states = [state]
    shas = [adapter_sha]
    if distributed:
        device = torch.device("cpu") if backend == "gloo" else torch.device("cuda", torch.cuda.current_device())
        losses = losses.to(device)
        dist.all_reduce(losses)                                          # the sum of the W local means
        losses = (losses / world_size).cpu()
        states, shas = [None] * world_size, [None] * world_size
        dist.all_gather_object(states, state)
        dist.all_gather_object(shas, adapter_sha)
    steady = [b - a for a, b in zip(stamps[1:], stamps[2:])] or [stamps[1] - stamps[0]]
    kinds = sorted({k for s in per_step for k in s})
    per_kind = {k: [s.get(k, 0) for s in per_step] for k in kinds}
    record = dict(
        strategy=strategy, world_size=world_size, backend=backend, **config,
        trainable_params=n_trainable, total_params=total_params, trainable_tensors=len(trainable),
        grad_bytes_reduced_per_step=_per_step(per_kind, "all_reduce" if strategy != "fsdp" else "reduce_scatter"),
        param_bytes_gathered_per_step=_per_step(per_kind, "all_gather"),
        bytes_per_step_each_step=per_kind,
        optimizer_state_elements_per_rank=states,
        losses=[float(x) for x in losses],
        adapter_sha256=adapter_sha,
        trainable_norm=norm,
        replicas_identical=len(set(shas)) == 1,
        seconds_per_step=statistics.median(steady),
        seconds=result["seconds"],
    )
    if counter.buckets is not None:
        record["ddp_buckets"] = [dict(numel=n, parameters=len(ps), frozen=sum(1 for p in ps if p not in trainable))
                                 for n, ps in counter.buckets]
    if accelerator is not None:
        record["accelerate_distributed_type"] = str(accelerator.distributed_type).split(".")[-1]
    return record


def _bare(name):
    """A parameter's name without the wrappers' prefixes (DDP's 'module.')."""
    return name.removeprefix("module.")


def _per_step(per_kind, kind):
    """The bytes of one step for ``kind``; every step moves the same, which is checked here."""
    values = per_kind.get(kind, [0])
    if len(set(values)) != 1:
        raise RuntimeError(f"{kind} moved different bytes at different steps: {values}")
    return values[0]


# ----------------------------------------------------------------------------- the CLI


def _parser():
    p = argparse.ArgumentParser(prog="python -m lora_ref.distributed", description=(
        "Fine-tune the tiny Llama with LoRA (or fully) on N processes and write what moved between them."))
    p.add_argument("--strategy", choices=STRATEGIES, required=True)
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun's --nproc_per_node)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="draws A and orders the batches")
    p.add_argument("--json", required=True, help="where rank 0 writes the record")
    p.add_argument("--backend", choices=BACKENDS, default="gloo", help="gloo (CPU) or nccl (one GPU per process)")
    p.add_argument("--lora-r", dest="r", type=int, default=DEFAULTS["r"])
    p.add_argument("--lora-alpha", dest="alpha", type=float, default=DEFAULTS["alpha"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="the GLOBAL batch, split over ranks")
    p.add_argument("--lr", type=float, default=None, help="default: the book's recipe (LoRA 5e-3, full 1e-3)")
    p.add_argument("--targets", default=DEFAULTS["targets"])
    p.add_argument("--timeout", type=int, default=120, help="seconds before torchrun is killed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    params = dict(steps=args.steps, seed=args.seed, backend=args.backend, r=args.r, alpha=args.alpha,
                  batch_size=args.batch_size, lr=args.lr, targets=args.targets)
    if args.worker:                                            # inside torchrun: one rank
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        record = _train(args.strategy, rank=rank, world_size=world, local_rank=int(os.environ["LOCAL_RANK"]),
                        **params)
        if rank == 0:
            _write_json(record, args.json)
        return 0
    try:
        record = run(args.strategy, args.nproc, json_path=args.json, timeout=args.timeout, **params)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.strategy} on {record['world_size']} process(es): loss {record['losses'][0]:.4f} -> "
          f"{record['losses'][-1]:.4f}, {record['grad_bytes_reduced_per_step']:,} gradient bytes and "
          f"{record['param_bytes_gathered_per_step']:,} parameter bytes per step; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
