"""The client: the only role that reads the text, and the only one that sees the logits.

    from mpcformer_jax.private import Client
    client = Client("serve_state/")              # reads endpoint.json, the card, our cert
    result = client.classify(["a gripping film", "dull"])
    result.predictions[0].label, result.cost.format()

It tokenizes locally and encodes the tokens: the rows of the public word-embedding table
when the model names one (loaded once from the client's own copy of that checkpoint and
hash-checked; a mismatch refuses before anything is shared), else one-hot rows. It cuts the
texts into queries that each fit a served (batch, length) bucket, pads each query's tokens
to the smallest served length that holds them, secret-shares the inputs and sends each node
its share over mutual TLS, then reconstructs the logits from the nodes' output shares. Node
0 may run the query in one execution with other clients' queries (batching.py); each node
returns only this query's rows of the output, on the call that sent it. A text longer than
the largest bucket is truncated, and its prediction says so.

What the nodes learn of a query: its number of texts and its padded length (as the size of
its shares shows anyway), never a token.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from mpcformer_jax.private import transport
from mpcformer_jax.private.config import ClusterConfig, parse_config
from mpcformer_jax.private.cost import CostReport, report_from_profiles
from mpcformer_jax.private.tls import Identity, identity

ENDPOINT = "endpoint.json"
# A node restarted (UNAVAILABLE), the queue was full (RESOURCE_EXHAUSTED), or a node never
# received this query's shares and node 0 dropped it from its batch (ABORTED).
_RETRY = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED")


class QueryError(RuntimeError):
    """A query was refused or failed; ``code`` is the gRPC status name (e.g.
    RESOURCE_EXHAUSTED for a full queue, FAILED_PRECONDITION for a changed model)."""

    def __init__(self, message: str, code: str = "UNKNOWN"):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Prediction:
    """One text's answer."""

    text: str
    logits: list[float]
    label: str | None
    probabilities: dict[str, float] | None
    tokens: int
    truncated: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class QueryResult:
    """Predictions of a call to ``classify``, and what it cost.

    Attributes:
      predictions: one per text, in order.
      buckets: the bucket of each execution this call's queries ran in.
      cost: the executions' totals (every row of them, other clients' included).
      wall_s: seconds the call took, end to end.
      queries: per query sent: its execution, rows used and padded there, seconds waiting
        in node 0's queue and running, and its share of the execution (its rows over the
        rows used) with that share of the bytes, messages and rounds.
    """

    predictions: list[Prediction]
    buckets: list[str]
    cost: CostReport
    wall_s: float
    queries: list[dict] = dataclasses.field(default_factory=list)

    @property
    def own_cost(self) -> dict:
        """This call's share of its executions: bytes, messages and rounds."""
        return {k: round(sum(q[k] for q in self.queries), 1)
                for k in ("bytes", "messages", "rounds")}

    def to_dict(self) -> dict:
        return {"results": [p.to_dict() for p in self.predictions], "buckets": self.buckets,
                "wall_s": self.wall_s, "queries": self.queries, "own_cost": self.own_cost,
                "cost": self.cost.to_dict()}


def prediction(text: str, logits, labels, tokens: int, truncated: bool) -> Prediction:
    """A Prediction from one row of logits: a label and a distribution, or for a one-output
    (regression) model its score alone."""
    row = [float(x) for x in logits]
    if len(row) == 1:
        return Prediction(text, row, None, None, tokens, truncated)
    z = np.exp(np.asarray(row) - max(row))
    probs = z / z.sum()
    names = list(labels) or [str(k) for k in range(len(row))]
    return Prediction(text, row, names[int(probs.argmax())],
                      {n: round(float(p), 4) for n, p in zip(names, probs, strict=True)},
                      tokens, truncated)


def _query_account(batch: dict, profiles: list[dict], cluster: ClusterConfig,
                   latency_s: float) -> dict:
    """One query's line of QueryResult.queries: node 0's account of its execution, and its
    share (rows over rows used) of the execution's bytes, messages and rounds."""
    total = report_from_profiles(cluster.protocol, cluster.world_size, [profiles]).total
    share = batch["rows"] / max(batch["rows_used"], 1)
    return {**batch, "latency_s": round(latency_s, 4), "share": round(share, 4),
            "execution_bytes": total.bytes, "execution_messages": total.messages,
            "execution_rounds": total.rounds, "bytes": share * total.bytes,
            "messages": share * total.messages, "rounds": share * total.rounds}


def read_endpoint(state_dir: str | Path) -> dict:
    """The service's endpoint.json; a missing one says how to start the service."""
    path = Path(state_dir) / ENDPOINT
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise QueryError(f"no service at {state_dir}: {path} does not exist; start one with "
                         f"`spu_run serve --state-dir {state_dir} ...`", "UNAVAILABLE") from None
    except json.JSONDecodeError as err:
        raise QueryError(f"{path} is not valid JSON ({err})", "UNAVAILABLE") from None


class Client:
    """A client of a served model.

    Args:
      state_dir: the service's state folder (endpoint.json, card/, certs/).
      name: this client's certificate name in the certs folder.
      certs: the certs folder (default: the one endpoint.json names).
      timeout_s: bound on one query, queueing included (default: the cluster's timeout_s,
        at least 600 s).
      retries: how often a query is sent again after the service restarted its nodes.
      table: the client's copy of the model's public word-embedding table (hash-checked);
        default: loaded from the checkpoint the card names. Unused for a model whose table
        is private.

    Raises:
      ValueError: the public table found has another hash than the card's (nothing shared).
    """

    def __init__(self, state_dir: str | Path, name: str = "client", certs: str | None = None,
                 timeout_s: float | None = None, retries: int = 2, table=None):
        import spu

        from mpcformer_jax.private.card import load_card
        from mpcformer_jax.private.model import client_table

        self.state_dir = Path(state_dir)
        self.endpoint = read_endpoint(self.state_dir)
        self.cluster: ClusterConfig = parse_config(self.endpoint["cluster"], "endpoint.json")
        self.ident: Identity = identity(certs or self.endpoint["certs"], name)
        card = self.state_dir / self.endpoint["card"]
        self.config, self.tokenizer, self.labels = load_card(card)
        if self.tokenizer is None:
            raise QueryError(f"the model card {card} has no tokenizer: cannot classify text")
        # Once, before any query: the public table the card names, or None (one-hot).
        self.table = client_table(self.config, table)
        self.buckets = sorted(((int(b), int(n)) for b, n in
                               (k.split("x") for k in self.endpoint["buckets"])),
                              key=lambda bl: (bl[0] * bl[1], bl))
        self.max_length = max(n for _, n in self.buckets)
        # A query may wait behind others (node 0 runs one at a time): give it room.
        self.timeout_s = timeout_s or max(600.0, self.cluster.timeout_s)
        self.retries = retries
        self.io = spu.Io(self.cluster.world_size, self.cluster.runtime_config())
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    @property
    def upload(self) -> dict:
        """The owner's weight upload (bytes per node, seconds), reported once per start."""
        return self.endpoint.get("upload", {})

    def _nodes(self) -> list[grpc.Channel]:
        with self._lock:
            if not self._channels:
                self._channels = [transport.channel(n["io"], n["id"], self.ident)
                                  for n in self.endpoint["nodes"]]
            return self._channels

    def connect(self, timeout_s: float = 60.0) -> None:
        """Opens the channel to every node now (TCP and the TLS handshake), so that the
        first query's latency holds none of it; queries connect by themselves otherwise.

        Raises:
          QueryError: UNAVAILABLE, a node did not answer within ``timeout_s``.
        """
        for ch, node in zip(self._nodes(), self.endpoint["nodes"], strict=True):
            try:
                grpc.channel_ready_future(ch).result(timeout=timeout_s)
            except grpc.FutureTimeoutError:
                raise QueryError(f"node {node['id']} at {node['io']} did not answer within "
                                 f"{timeout_s:g} s: is the service up?",
                                 "UNAVAILABLE") from None

    def close(self) -> None:
        with self._lock:
            for ch in self._channels:
                ch.close()
            self._channels = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ text -> buckets

    def pick_bucket(self, batch: int, length: int) -> tuple[int, int]:
        """The cheapest served bucket holding ``batch`` texts of ``length`` tokens (length
        capped at the largest served length: longer texts are truncated)."""
        length = min(length, self.max_length)
        for b, n in self.buckets:
            if b >= batch and n >= length:
                return b, n
        raise QueryError(f"no bucket holds {batch} texts of {length} tokens; served: "
                         f"{self.endpoint['buckets']}")

    def _next_query(self, lengths: list[int]) -> tuple[int, int, int]:
        """(batch, length, texts taken) for the next query over texts of these token counts:
        the bucket that takes the most texts (a query's cost is mostly its rounds, which do
        not grow with the batch), then the shortest, then the smallest. The query is sent as
        ``texts taken x length``: node 0 fits it into an execution (batching.py), so the
        shortest length lets it share one with short queries of other clients. A bucket of
        the largest served length always fits: longer texts are truncated."""
        best = None
        for b, n in self.buckets:
            take = min(b, len(lengths))
            if n >= min(max(lengths[:take]), self.max_length):
                key = (-take, n, b * n)
                if best is None or key < best[0]:
                    best = (key, (b, n, take))
        return best[1]

    def classify(self, texts: list[str] | str) -> QueryResult:
        """Classifies texts privately, in as few queries as the buckets allow.

        Raises:
          ValueError: an empty text.
          QueryError: the service refused or failed a query (its message says why).
        """
        from mpcformer_jax.private.model import encode_client_inputs, tokenize

        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no text to classify")
        empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise ValueError(f"text {empty[0]} is empty: there is nothing to classify")
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        start = time.perf_counter()
        predictions, buckets, profiles, queries = [], [], [], []
        i = 0
        while i < len(texts):
            b, n, take = self._next_query(lengths[i:])
            chunk, lens = texts[i:i + take], lengths[i:i + take]
            i += take
            ids, mask = tokenize(self.tokenizer, chunk, n)  # only our rows: no padding rows
            client_input, mask_f = encode_client_inputs(self.config, ids, mask, self.table)
            sent = time.perf_counter()
            logits, node_profiles, batch = self.run_query([client_input, mask_f])
            profiles.append(node_profiles)
            buckets.append(batch["bucket"])
            queries.append(_query_account(batch, node_profiles, self.cluster,
                                          time.perf_counter() - sent))
            predictions += [prediction(t, lg, self.labels, k, k > n)
                            for t, lg, k in zip(chunk, logits, lens, strict=True)]
        cost = report_from_profiles(self.cluster.protocol, self.cluster.world_size, profiles)
        cost.input_bytes = {"client": sum(q[0].get("client_bytes", 0) for q in profiles)}
        return QueryResult(predictions, buckets, cost, time.perf_counter() - start, queries)

    # ------------------------------------------------------------------ one query

    def run_query(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, list[dict], dict]:
        """Sends one query (client input and mask, ``rows x length`` each) to every node;
        returns (its rows of logits, the nodes' profiles of its execution, node 0's account
        of the execution: bucket, rows used and padded, queue wait).

        A query the service lost because it restarted its nodes (UNAVAILABLE), or could not
        take because its queue was full (RESOURCE_EXHAUSTED), is sent again with fresh shares,
        up to ``retries`` times; other refusals raise QueryError at once.
        """
        for attempt in range(self.retries + 1):
            try:
                return self._query_once(arrays)
            except QueryError as err:
                if err.code not in _RETRY or attempt == self.retries:
                    raise
                time.sleep(1.0 + attempt)
                if err.code == "UNAVAILABLE":
                    self._refresh()
        raise AssertionError("unreachable")

    def _refresh(self) -> None:
        """Re-reads endpoint.json after a restart (addresses stay; the model may change)."""
        self.close()
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                endpoint = read_endpoint(self.state_dir)
                if endpoint.get("ready"):
                    self.endpoint = endpoint
                    return
            except QueryError:
                pass
            time.sleep(0.5)

    def _query_once(self, arrays: list[np.ndarray]):
        from mpcformer_jax.private.runtime import (
            blobs_to_shares,
            make_shares,
            share_bytes,
            shares_to_blobs,
        )

        names = ("x:0", "x:1")
        shares = make_shares(self.io, dict(zip(names, arrays, strict=True)))
        qid = secrets.token_hex(16)
        calls = []
        for rank, ch in enumerate(self._nodes()):
            own = [shares[n][rank] for n in names]
            counts, blobs = shares_to_blobs(own)
            rows, length = arrays[1].shape
            stream = transport.stream_frames({"query_id": qid, "rows": int(rows),
                                              "length": int(length),
                                              "fingerprint": self.endpoint["fingerprint"],
                                              "counts": counts}, blobs)
            try:
                call = transport.stream_unary(ch, "Query").future(stream,
                                                                  timeout=self.timeout_s)
            except ValueError:  # grpc: "Cannot invoke RPC: Channel closed!"
                for _, c in calls:
                    c.cancel()
                raise QueryError("the client was closed while the query was being sent; "
                                 "nothing was answered, send it again", "CANCELLED") from None
            calls.append((share_bytes(own), call))
        del shares
        # Wait on every node at once: one that fails (or dies) ends the query now, not after
        # the others give up waiting for it in the MPC.
        settled = threading.Semaphore(0)
        for _, call in calls:
            call.add_done_callback(lambda _call: settled.release())
        for _ in calls:
            settled.acquire()
            if any(c.done() and c.exception() is not None for _, c in calls):
                break
        outs, profiles, batches, failure = [], [], [], None
        for rank, (sent, call) in enumerate(calls):
            if not call.done():
                continue  # a node failed first; this one is cancelled below
            node = self.endpoint["nodes"][rank]["id"]
            try:
                header, blobs = transport.unpack(call.result())
            except grpc.RpcError as err:
                text = transport.error_text(err)
                if err.code() == grpc.StatusCode.UNAVAILABLE and "retry" not in text:
                    text = (f"unavailable ({text}): the query was not answered; retry (a "
                            "local service restarts failed nodes)")
                failure = failure or QueryError(f"node {node}: {text}", err.code().name)
                continue
            except transport.FrameError as err:
                failure = failure or QueryError(f"node {node} sent a bad answer: {err}")
                continue
            if header.get("query_id") != qid:
                failure = failure or QueryError(f"node {node} answered another query")
                continue
            outs += blobs_to_shares(header["counts"], blobs)
            profiles.append({**header["profile"], "client_bytes": sent})
            batches.append(header.get("batch", {}))
        if failure is not None or len(outs) < len(calls):
            for _, call in calls:
                call.cancel()
            raise failure or QueryError("a node did not answer", "UNAVAILABLE")
        profiles[0]["client_bytes"] = sum(p["client_bytes"] for p in profiles)
        logits = np.asarray(self.io.reconstruct(outs))
        if logits.shape[0] != arrays[1].shape[0] or len({b.get("execution") for b in batches}) > 1:
            raise QueryError(f"the nodes answered {logits.shape[0]} rows of executions "
                             f"{sorted({str(b.get('execution')) for b in batches})} to a query "
                             f"of {arrays[1].shape[0]}")
        return logits, profiles, {**batches[0], "query_id": qid}

    # ------------------------------------------------------------------ what runs

    def status(self) -> dict:
        """The service's aggregate figures (status.py): uptime, restarts, queue depth,
        answered and failed queries, batches, latency percentiles, each node's memory."""
        from mpcformer_jax.private.status import service_status

        return service_status(self.state_dir, self.ident)

    def info(self) -> list[dict]:
        """Each node's own account: readiness, model fingerprint, program digests."""
        out = []
        for node, ch in zip(self.endpoint["nodes"], self._nodes(), strict=True):
            try:
                header, _ = transport.unpack(transport.unary(ch, "Info")(b"{}", timeout=10))
            except grpc.RpcError as err:
                raise QueryError(f"node {node['id']}: {transport.error_text(err)}",
                                 err.code().name) from None
            out.append(header)
        return out

    def verify(self) -> dict[str, str]:
        """Recompiles every served bucket from the public card and checks that each node runs
        exactly that program (SPU compilation is deterministic). Returns bucket -> digest.

        Raises:
          QueryError: a node runs a program other than the card's, or serves other buckets.
        """
        from mpcformer_jax.private.model import compile_for, prepared_param_shapes
        from mpcformer_jax.private.program import program_digest

        # The card's config is the prepared one; the shapes are what the owner shares.
        params = prepared_param_shapes(self.config)
        copts = self.cluster.compiler_options()
        mine = {f"{b}x{n}": program_digest(compile_for(self.config, params, b, n, copts))
                for b, n in self.buckets}
        for node in self.info():
            if node.get("program_digests") != mine:
                raise QueryError(f"node {node.get('node')} runs a program that does not match "
                                 "the one compiled from the public card: do not send it text",
                                 "FAILED_PRECONDITION")
        return mine
