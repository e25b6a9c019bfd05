"""Rewrite three sub-graphs of the exported ONNX into the node forms that ONNX Runtime's
transformer optimizer matches, without changing a value.

ORT's Stable Diffusion fusions (``onnxruntime.transformers.optimizer``, model types "unet" and
"vae") were written against the TorchScript exporter's graphs of diffusers. The dynamo exporter
writes the same math in other forms, and ORT then fuses nothing:

- **GroupNorm** (``FusionGroupNorm``): Reshape(x, [0, G, -1]) → InstanceNormalization →
  Reshape → Mul(γ) → Add(β). ORT wants the second Reshape's shape to be ``Shape(x)``; a static
  export folds it to a constant. Rewritten: the constant becomes ``Shape(x)``.
- **GEGLU** (``FusionBiasSplitGelu``): the exporter writes ``h.chunk(2, -1)`` as one ``Split``;
  ORT wants the pair of ``Slice`` nodes whose bounds come from
  ``Shape(h) → Gather(-1) → Add(1) → Div(2) → Mul(1 | 2)``, as TorchScript wrote ``chunk``.
- **Attention** (``FusionAttentionUnet``, its "PyTorch 1" form): the exporter writes
  ``scaled_dot_product_attention`` on (B, H, S, D) with √scale on Q and on Kᵀ, and Kᵀ as
  Transpose/Reshape/Transpose/Reshape. ORT detects the head count from a constant Reshape
  shape [0, 0, H, D] and matches batched (B·H, S, D) products:
  Q: MatMul → Reshape → Transpose → Reshape; K: the same → Transpose; V: the same;
  MatMul(Q, Kᵀ) → Mul(scale) → Softmax → MatMul(·, V) → Reshape → Transpose → Reshape.
  (ORT's "PyTorch 2" form detects the head count with ``int()`` of a 1-element array, which
  NumPy ≥ 2.4 refuses, so that form cannot fuse with today's NumPy.)

Each rewrite checks the whole sub-graph it replaces, leaves anything else alone, and works on
static and dynamic exports alike (the new shape inputs are ``Shape`` of a tensor or constants
with 0 = "copy this axis"). ``rewrite_for_ort(model)`` returns how many of each it rewrote.
"""
import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper


class _Graph:
    """Producers, consumers and small constants of one ONNX graph, and new-node helpers."""

    def __init__(self, model, serial):
        self.model, self.graph = model, model.graph
        self.serial = serial  # numbers the new values, unique across the passes over a model
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.new_nodes, self.dead = [], set()
        self._shapes = None

    def const(self, name):
        """The value of an initializer or Constant node's output (inline data only), or None."""
        t = self.inits.get(name)
        if t is not None:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(t)
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant" and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def dims(self, name):
        """The shape recorded for a value (ints, and names for symbolic axes), or None."""
        if self._shapes is None:
            self._shapes = {}
            for v in list(self.graph.value_info) + list(self.graph.input) + list(
                    self.graph.output):
                t = v.type.tensor_type
                if t.HasField("shape"):
                    self._shapes[v.name] = [d.dim_value if d.HasField("dim_value") else
                                            d.dim_param for d in t.shape.dim]
        return self._shapes.get(name)

    def parent(self, node, index, op_type):
        if index >= len(node.input):
            return None
        p = self.producer.get(node.input[index])
        return p if p is not None and p.op_type == op_type else None

    def only_consumer(self, name, op_type=None):
        users = self.consumers.get(name, [])
        outputs = {o.name for o in self.graph.output}
        if len(users) != 1 or name in outputs:
            return None
        return users[0] if op_type is None or users[0].op_type == op_type else None

    def fresh(self, stem):
        return f"ort_form_{stem}_{next(self.serial)}"

    def add_const(self, stem, value):
        name = self.fresh(stem)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def add(self, op_type, inputs, stem, **attrs):
        out = self.fresh(stem)
        self.new_nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def commit(self):
        """Drop the replaced nodes, and any node no graph output needs any more (a dynamic
        export's Shape arithmetic for a replaced Reshape), and put the new ones in
        topological order."""
        nodes = [n for n in self.graph.node if id(n) not in self.dead] + self.new_nodes
        producer = {o: n for n in nodes for o in n.output}
        live, todo = set(), [o.name for o in self.graph.output]
        while todo:
            n = producer.get(todo.pop())
            if n is not None and id(n) not in live:
                live.add(id(n))
                todo.extend(n.input)
        nodes = [n for n in nodes if id(n) in live]
        produced = {i.name for i in self.graph.input} | set(self.inits) | {
            t.name for t in self.graph.initializer} | {""}
        ordered, pending = [], nodes
        while pending:
            rest = []
            for n in pending:
                if all(i in produced for i in n.input):
                    ordered.append(n)
                    produced.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                raise RuntimeError("ORT-form rewrite left a cycle or a dangling input")
            pending = rest
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        # Constants only the dropped nodes read (ORT would warn about each at load).
        used = {i for n in ordered for i in n.input} | {o.name for o in self.graph.output}
        kept = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)


def _group_norms(g):
    """Reshape(x, [·, G, -1]) → InstanceNormalization → Reshape(const) → Mul → Add: the second
    Reshape's shape becomes Shape(x). Returns the number rewritten."""
    n_done = 0
    for norm in [n for n in g.graph.node if n.op_type == "InstanceNormalization"]:
        first = g.parent(norm, 0, "Reshape")
        back = g.only_consumer(norm.output[0], "Reshape")
        if first is None or back is None or g.const(back.input[1]) is None:
            continue
        flat = g.const(first.input[1])
        if flat is None or flat.shape != (3,) or flat[2] != -1:
            continue
        mul = g.only_consumer(back.output[0], "Mul")
        if mul is None or g.only_consumer(mul.output[0], "Add") is None:
            continue
        back.input[1] = g.add("Shape", [first.input[0]], "group_norm_shape")
        n_done += 1
    return n_done


def _gelu_input(g, name):
    """True when ``name`` feeds an erf GELU: Div(name, √2) → Erf, or a Gelu node."""
    for user in g.consumers.get(name, []):
        if user.op_type == "Gelu":
            return True
        if user.op_type == "Div" and any(u.op_type == "Erf"
                                         for u in g.consumers.get(user.output[0], [])):
            return True
    return False


def _geglus(g):
    """Split(h, 2, last axis) → (a, gate), gate → GELU: the Slice pair of TorchScript's chunk."""
    n_done = 0
    for split in [n for n in g.graph.node if n.op_type == "Split"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
        if len(split.output) != 2 or len(split.input) > 1 or attrs.get("num_outputs") != 2:
            continue
        axis = attrs.get("axis", 0)
        dims = g.dims(split.input[0])
        rank = None if dims is None else len(dims)
        if not (axis == -1 or (rank is not None and axis == rank - 1)):
            continue
        if g.parent(split, 0, "Add") is None or not _gelu_input(g, split.output[1]):
            continue
        h = split.input[0]
        one, two = g.add_const("one", np.array([1], np.int64)), g.add_const(
            "two", np.array([2], np.int64))
        last = g.add_const("last", np.array([-1], np.int64))
        width = g.add("Gather", [g.add("Shape", [h], "geglu_shape"), last], "geglu_width", axis=0)
        half = g.add("Div", [g.add("Add", [width, one], "geglu_round"), two], "geglu_half")
        mid, end = g.add("Mul", [half, one], "geglu_mid"), g.add("Mul", [half, two], "geglu_end")
        zero = g.add_const("zero", np.array([0], np.int64))
        g.new_nodes.append(helper.make_node("Slice", [h, zero, mid, last], [split.output[0]],
                                            name=g.fresh("geglu_value")))
        g.new_nodes.append(helper.make_node("Slice", [h, mid, end, last], [split.output[1]],
                                            name=g.fresh("geglu_gate")))
        g.dead.add(id(split))
        _residual_second(g, split.output[0])
        n_done += 1
    return n_done


def _residual_second(g, value):
    """``x + ff(x)`` → ``ff(x) + x`` after a GEGLU feed-forward: ORT's BiasAdd fusion wants the
    feed-forward's bias Add as the residual Add's first input, as diffusers writes it."""
    gate_mul = g.only_consumer(value, "Mul")
    out = gate_mul and g.only_consumer(gate_mul.output[0], "MatMul")
    bias = out and g.only_consumer(out.output[0], "Add")
    residual = bias and g.only_consumer(bias.output[0], "Add")
    if residual is not None and residual.input[1] == bias.output[0]:
        residual.input[0], residual.input[1] = residual.input[1], residual.input[0]


def _heads(g, reshape):
    """(H, D) of a Reshape of (B, S, H·D) to (B, S, H, D): from its constant shape (static
    exports) or its output's shape (dynamic ones, where only B and S are symbolic)."""
    shape = g.const(reshape.input[1])
    if shape is not None and shape.shape == (4,) and min(shape[2], shape[3]) >= 1:
        return int(shape[2]), int(shape[3])
    dims = g.dims(reshape.output[0])
    if dims is not None and len(dims) == 4 and all(isinstance(d, int) for d in dims[2:]):
        return dims[2], dims[3]
    return None


def _head_path(g, name, k_transposed):
    """Match Q or V: Transpose(0,2,1,3) ← Reshape(const [·,·,H,D]) ← MatMul; K (whose input to
    the score MatMul is Kᵀ after the exporter's Transpose/Reshape/Transpose/Reshape):
    Reshape ← Transpose(0,2,1) ← Reshape ← Transpose(0,2,1,3) ← Reshape ← MatMul.
    Returns (projection MatMul output, (H, D), nodes) or None."""
    nodes = []
    n = g.producer.get(name)
    if k_transposed:
        for op in ("Reshape", "Transpose", "Reshape"):
            if n is None or n.op_type != op:
                return None
            nodes.append(n)
            n = g.producer.get(n.input[0])
    if n is None or n.op_type != "Transpose" or \
            helper.get_attribute_value(n.attribute[0]) != [0, 2, 1, 3]:
        return None
    nodes.append(n)
    r = g.parent(n, 0, "Reshape")
    if r is None or _heads(g, r) is None or g.parent(r, 0, "MatMul") is None:
        return None
    nodes.append(r)
    return r.input[0], _heads(g, r), nodes


def _scaled(g, name):
    """(input, scale, Mul) of Mul(input, scalar constant), else (name, None, None); the scale
    as a 0-d array of the graph's float type."""
    mul = g.producer.get(name)
    if mul is not None and mul.op_type == "Mul":
        c = g.const(mul.input[1])
        if c is not None and c.size == 1:
            return mul.input[0], c.reshape(()), mul
    return name, None, None


def _attentions(g):
    """scaled_dot_product_attention as the exporter writes it → ORT's batched (B·H, S, D) form."""
    n_done = 0
    for softmax in [n for n in g.graph.node if n.op_type == "Softmax"]:
        scores = g.parent(softmax, 0, "MatMul")
        context = g.only_consumer(softmax.output[0], "MatMul")
        if scores is None or context is None or context.input[0] != softmax.output[0]:
            continue
        out_t = g.only_consumer(context.output[0], "Transpose")
        if out_t is None or helper.get_attribute_value(out_t.attribute[0]) != [0, 2, 1, 3] or \
                g.only_consumer(out_t.output[0], "Reshape") is None:
            continue
        q_in, q_scale, q_mul = _scaled(g, scores.input[0])
        k_in, k_scale, k_mul = _scaled(g, scores.input[1])
        q, k, v = (_head_path(g, q_in, False), _head_path(g, k_in, True),
                   _head_path(g, context.input[1], False))
        if None in (q, k, v, q_scale, k_scale) or not q[1] == k[1] == v[1]:
            continue
        # Nothing else may read the replaced values (but the Shape nodes of a dynamic export's
        # own shape arithmetic for them, which go with them).
        if any(sum(u.op_type != "Shape" for u in g.consumers.get(x.output[0], [])) != 1
               for x in q[2] + k[2] + v[2]):
            continue
        heads, head_dim = q[1]
        split_heads = g.add_const("split_heads", np.array([0, 0, heads, head_dim], np.int64))
        minus_one = g.add_const("minus_one", np.array([-1], np.int64))
        n_heads = g.add_const("heads", np.array([-1, heads], np.int64))

        def batched(projection, stem):  # (B, S, H·D) → (B·H, S, D)
            x = g.add("Reshape", [projection, split_heads], f"{stem}_heads")
            x = g.add("Transpose", [x], f"{stem}_bhsd", perm=[0, 2, 1, 3])
            rows = g.add("Slice", [g.add("Shape", [x], f"{stem}_shape"),
                                   g.add_const("from", np.array([2], np.int64)),
                                   g.add_const("to", np.array([4], np.int64))], f"{stem}_sd")
            return g.add("Reshape", [x, g.add("Concat", [minus_one, rows], f"{stem}_3d",
                                               axis=0)], f"{stem}_batched")

        q3, k3, v3 = batched(q[0], "q"), batched(k[0], "k"), batched(v[0], "v")
        kt = g.add("Transpose", [k3], "k_t", perm=[0, 2, 1])
        s = g.add("MatMul", [q3, kt], "scores")
        # √scale on Q and on Kᵀ, as the exporter wrote it, is scale on Q·Kᵀ.
        scale = (q_scale.astype(np.float64) * k_scale).astype(q_scale.dtype)
        s = g.add("Mul", [s, g.add_const("scale", scale)], "scaled")
        p = g.add("Softmax", [s], "probs", axis=-1)
        o3 = g.add("MatMul", [p, v3], "context")  # (B·H, S, D)
        sd = g.add("Slice", [g.add("Shape", [o3], "o_shape"),
                             g.add_const("from", np.array([1], np.int64)),
                             g.add_const("to", np.array([3], np.int64))], "o_sd")
        o4 = g.add("Reshape", [o3, g.add("Concat", [n_heads, sd], "o_4d", axis=0)], "o_bhsd")
        g.new_nodes.append(helper.make_node("Transpose", [o4], [out_t.output[0]],
                                            name=g.fresh("o_bshd"), perm=[0, 2, 1, 3]))
        for x in q[2] + k[2] + v[2] + [q_mul, k_mul, scores, softmax, context, out_t]:
            g.dead.add(id(x))
        n_done += 1
    return n_done


def rewrite_for_ort(model):
    """Rewrite ``model`` (an onnx.ModelProto; weights may stay external) in place; returns
    {"group_norm": n, "geglu": n, "attention": n}, the sub-graphs rewritten."""
    counts, serial = {}, itertools.count()
    for name, rewrite in (("group_norm", _group_norms), ("geglu", _geglus),
                          ("attention", _attentions)):
        g = _Graph(model, serial)
        counts[name] = rewrite(g)
        g.commit()
    return counts
