"""Graph rewrites applied to the student's ONNX graph when it is exported (needs the ``onnx`` package).

Why they exist: torch's dynamo exporter writes attention and GELU as patterns ONNX Runtime's
own fusions do not recognise, so the model ran as dozens of small element-wise kernels per
layer. Measured on the MiniLM student (single-thread CPU time, 4 x 224 tokens, ONNX Runtime
1.32): the exported exact GELU (Div, Erf, Add, Mul, Mul) cost 6.0 us per token and layer against
2.5 us for ONNX Runtime's ``Gelu`` kernel; each layer's attention (three projections, reshapes,
transposes, a scaled and masked softmax) becomes one ``Attention`` kernel, which the int8
quantizer turns into ``QAttention`` (one int8 GEMM for Q, K and V); and the last layer is only
computed for the first token, the one the classifier reads.

The rewrites add nodes and never new weights: packed Q/K/V weights are ``Concat`` nodes over
the original initializers (ONNX Runtime folds them when it loads the model), so every weight
can still be referenced from the base model's file (:mod:`feddale.method.onnx_bundle`). Each
rewrite matches its exact pattern and leaves anything else alone (a Llama-family student, whose
queries and keys pass through rotary embeddings, has nothing to match); the exporter checks the
rewritten graph numerically against the graph as exported before it keeps it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

MS_DOMAIN = "com.microsoft"
MASK_INT32 = "feddale_attention_mask_int32"
# Operators that compute each token's output from that token's input alone (given 1-D constants).
_PER_TOKEN = {("", "LayerNormalization"), ("", "Add"), ("", "Mul"), ("", "MatMul"), (MS_DOMAIN, "Gelu")}


class _Graph:
    """Lookups over a graph's nodes and constant initializers (a snapshot taken once per rewrite)."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.nodes = list(graph.node)  # one wrapper per node, so identity comparisons hold
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)
        self.consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}

    def made_by(self, name: str, op: str) -> Any | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def sole_consumer(self, name: str, op: str) -> Any | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def scalar(self, name: str) -> float | None:
        value = self.consts.get(name)
        return None if value is None or value.size != 1 else float(value.reshape(()))


def fuse(model: Any) -> dict[str, int]:
    """Fuse attention and GELU in ``model`` (a ModelProto with its weights, changed in place) and
    compute the last layer for the first token only when that is all the classifier reads.
    Returns how many nodes each rewrite replaced or added."""
    counts = {"attention": _fuse_attention(model), "gelu": _fuse_gelu(model)}
    _drop_dead(model.graph)  # the replaced nodes would otherwise still read the tensors pruned next
    counts["first_token"] = _first_token_only(model)
    if any(counts.values()):
        _drop_dead(model.graph)
        if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
            from onnx import helper

            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _replace_nodes(model: Any, nodes: list[Any]) -> None:
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _projection(g: _Graph, name: str, perm: list[int]) -> tuple[str, str, str, Any] | None:
    """``Transpose(perm) <- Reshape <- Add(bias) <- MatMul(x, W)`` ending in ``name``: (x, W, bias, Reshape)."""
    transpose = g.made_by(name, "Transpose")
    if transpose is None or list(_attr(transpose, "perm", [])) != perm:
        return None
    reshape = g.made_by(transpose.input[0], "Reshape")
    add = reshape and g.made_by(reshape.input[0], "Add")
    matmul = add and g.made_by(add.input[0], "MatMul")
    if matmul is None:
        return None
    weight, bias = g.consts.get(matmul.input[1]), g.consts.get(add.input[1])
    if weight is None or bias is None or weight.ndim != 2 or bias.shape != (weight.shape[1],):
        return None
    return matmul.input[0], matmul.input[1], add.input[1], reshape


def _head_size(g: _Graph, reshape: Any) -> int | None:
    """The last dimension a per-head Reshape targets: a constant shape, or the last input of its Concat."""
    shape = g.consts.get(reshape.input[1])
    if shape is None:
        concat = g.made_by(reshape.input[1], "Concat")
        shape = concat and g.consts.get(concat.input[-1])
    if shape is None or np.ravel(shape).size == 0 or int(np.ravel(shape)[-1]) <= 0:
        return None
    return int(np.ravel(shape)[-1])


def _fuse_attention(model: Any) -> int:
    """``softmax(Q K^T * scale + mask) V`` with its projections and head reshapes -> ``Attention``.

    The additive mask the exporter builds from ``attention_mask`` is replaced by the raw 0/1
    mask, which ``Attention`` applies itself; the exporter's numerical check is what confirms
    that the mask meant padding only.
    """
    from onnx import TensorProto, helper

    if "attention_mask" not in {i.name for i in model.graph.input}:
        return 0
    g = _Graph(model.graph)
    replace: dict[str, list[Any]] = {}
    for softmax in (n for n in g.nodes if n.op_type == "Softmax"):
        masked = g.made_by(softmax.input[0], "Add")
        scaled = masked and g.producer.get(masked.input[0])
        if scaled is None or scaled.op_type not in ("Mul", "Div"):
            continue
        factor = g.scalar(scaled.input[1])
        scores = g.made_by(scaled.input[0], "MatMul")
        context = g.sole_consumer(softmax.output[0], "MatMul")
        if not factor or scores is None or context is None or context.input[0] != softmax.output[0]:
            continue
        q = _projection(g, scores.input[0], [0, 2, 1, 3])
        k = _projection(g, scores.input[1], [0, 2, 3, 1])
        v = _projection(g, context.input[1], [0, 2, 1, 3])
        merge = g.sole_consumer(context.output[0], "Transpose")
        out = merge and g.sole_consumer(merge.output[0], "Reshape")
        if q is None or k is None or v is None or out is None or list(_attr(merge, "perm", [])) != [0, 2, 1, 3]:
            continue
        head = _head_size(g, q[3])
        shape = g.consts[q[1]].shape
        if not q[0] == k[0] == v[0] or head is None or shape[1] % head or not g.consts[k[1]].shape == g.consts[v[1]].shape == shape:
            continue
        name = f"feddale_attention_{len(replace)}"
        replace[out.output[0]] = [
            helper.make_node("Concat", [q[1], k[1], v[1]], [f"{name}_qkv_weight"], name=f"{name}_qkv_weight", axis=1),
            helper.make_node("Concat", [q[2], k[2], v[2]], [f"{name}_qkv_bias"], name=f"{name}_qkv_bias", axis=0),
            helper.make_node(
                "Attention", [q[0], f"{name}_qkv_weight", f"{name}_qkv_bias", MASK_INT32], [out.output[0]], name=name,
                domain=MS_DOMAIN, num_heads=shape[1] // head,
                scale=factor if scaled.op_type == "Mul" else 1.0 / factor,
            ),
        ]
    if not replace:
        return 0
    cast = helper.make_node("Cast", ["attention_mask"], [MASK_INT32], to=TensorProto.INT32, name="feddale_mask_cast")
    _replace_nodes(model, [cast, *(n for node in g.nodes for n in replace.get(node.output[0], [node]))])
    return len(replace)


def _fuse_gelu(model: Any) -> int:
    """Exact GELU as exported, ``x * (0.5 * (1 + erf(x / sqrt 2)))`` -> ``Gelu(x)``."""
    from onnx import helper

    g = _Graph(model.graph)

    def other(node: Any, name: str) -> str:
        return node.input[1] if node.input[0] == name else node.input[0]

    replace: dict[str, Any] = {}
    for erf in (n for n in g.nodes if n.op_type == "Erf"):
        div = g.made_by(erf.input[0], "Div")
        root2 = div and g.scalar(div.input[1])
        if root2 is None or abs(root2 - 2**0.5) > 1e-6:
            continue
        x = div.input[0]
        one = g.sole_consumer(erf.output[0], "Add")
        half = one and g.sole_consumer(one.output[0], "Mul")
        out = half and g.sole_consumer(half.output[0], "Mul")
        if (out is None or g.scalar(other(one, erf.output[0])) != 1.0
                or g.scalar(other(half, one.output[0])) != 0.5 or other(out, half.output[0]) != x):
            continue
        replace[out.output[0]] = helper.make_node("Gelu", [x], [out.output[0]], name=f"feddale_gelu_{len(replace)}", domain=MS_DOMAIN)
    if replace:
        _replace_nodes(model, [replace.get(node.output[0], node) for node in g.nodes])
    return len(replace)


def _first_token_only(model: Any) -> int:
    """Compute only what the classifier reads when it reads the first token (BERT's ``[CLS]``).

    The exported classifier takes ``Gather(hidden, 0, axis=1)`` of the last hidden states, yet
    the graph computes the last layer for every token. Working back from that Gather, every
    per-token node whose outputs are read only at the first token is recomputed on the first
    token alone, and a fused ``Attention`` among them becomes a ``MultiHeadAttention`` whose
    query is the first token while keys and values still cover the whole window. On the MiniLM
    student that drops most of one of its six layers.
    """
    from onnx import helper, numpy_helper

    g = _Graph(model.graph)
    outputs = {out.name for out in model.graph.output}

    def is_first_gather(node: Any) -> bool:
        index = g.consts.get(node.input[1]) if node.op_type == "Gather" else None
        return index is not None and index.ndim == 0 and int(index) == 0 and _attr(node, "axis", 0) == 1

    def per_token(node: Any) -> bool:
        if (node.domain, node.op_type) not in _PER_TOKEN or _attr(node, "axis", -1) != -1:
            return False
        if node.op_type == "MatMul":
            return node.input[0] not in g.consts and node.input[1] in g.consts and g.consts[node.input[1]].ndim == 2
        return all(g.consts[name].ndim <= 1 for name in node.input if name in g.consts)

    def packed(node: Any) -> tuple[list[str], list[str]] | None:
        """The separate Q/K/V weights and biases behind a fused Attention's Concat inputs."""
        if node.domain != MS_DOMAIN or node.op_type != "Attention":
            return None
        weights, biases = g.made_by(node.input[1], "Concat"), g.made_by(node.input[2], "Concat")
        if weights is None or biases is None or len(weights.input) != 3 or len(biases.input) != 3:
            return None
        return list(weights.input), list(biases.input)

    target = next((n for n in g.nodes if is_first_gather(n)), None)
    if target is None:
        return 0
    # first-only: a node whose every output is read only at the first token. Reverse graph order
    # visits every consumer before its producer. Attention qualifies by its output but needs its
    # input in full, so it never makes its producer first-only.
    first_only: set[int] = set()
    for node in reversed(g.nodes):
        if not (per_token(node) or packed(node)) or any(out in outputs for out in node.output):
            continue
        readers = [c for out in node.output for c in g.consumers.get(out, [])]
        if readers and all((c is target and c.input[0] in node.output)
                           or (id(c) in first_only and not packed(c)) for c in readers):
            first_only.add(id(node))
    if id(g.producer.get(target.input[0])) not in first_only:
        return 0

    added: list[Any] = []
    done: dict[str, str] = {}
    slicing = {"feddale_first_start": [0], "feddale_first_end": [1], "feddale_first_axis": [1]}

    def first(name: str) -> str:
        """A tensor holding ``name[:, 0:1]``."""
        if name in done:
            return done[name]
        node = g.producer.get(name)
        out = f"{name}_first"
        if node is None or id(node) not in first_only:
            added.append(helper.make_node("Slice", [name, *slicing], [out], name=f"{out}_slice"))
        elif packed(node):
            out = first_token_attention(node)
        else:
            inputs = [i if not i or i in g.consts else first(i) for i in node.input]
            copy = helper.make_node(node.op_type, inputs, [out], name=f"{node.name or name}_first", domain=node.domain)
            copy.attribute.extend(node.attribute)
            added.append(copy)
        done[name] = out
        return out

    def first_token_attention(node: Any) -> str:
        (weights, biases), x, mask = packed(node), node.input[0], node.input[3]
        base = f"{node.output[0]}_first"
        projected = []
        for part, source in zip("qkv", (first(x), x, x)):  # q of the first token; k and v of every token
            name = f"{base}_{part}"
            index = "qkv".index(part)
            added.append(helper.make_node("MatMul", [source, weights[index]], [f"{name}_raw"], name=f"{name}_matmul"))
            added.append(helper.make_node("Add", [f"{name}_raw", biases[index]], [name], name=f"{name}_bias_add"))
            projected.append(name)
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        added.append(helper.make_node("MultiHeadAttention", [*projected, "", mask], [base], name=f"{base}_mha",
                                      domain=MS_DOMAIN, **attributes))
        return base

    target.input[0] = first(target.input[0])
    at = next(i for i, n in enumerate(g.nodes) if n is target)
    _replace_nodes(model, g.nodes[:at] + added + g.nodes[at:])
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in slicing.items())
    return sum(1 for n in added if n.op_type != "Slice")


def _drop_dead(graph: Any) -> None:
    """Remove nodes no graph output depends on, then initializers no node reads."""
    live = {out.name for out in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in live for out in node.output):
            kept.append(node)
            live.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = [init for init in graph.initializer if init.name in live]
    del graph.initializer[:]
    graph.initializer.extend(used)
