"""The host store of MCTS contexts' keys/values: its LRU budget, and a context written from its lineage."""
import numpy as np

from rstar_jax.kv_store import ContextStore, StoredContext


def test_context_store_holds_its_budget_dropping_nodes_before_their_ancestors():
    def node(text, tokens, parent=None):  # each node holds `tokens` keys/values of its own
        return StoredContext(text, np.zeros(tokens, np.int32), np.zeros((2, 1, 1, tokens, 4), np.float32), parent)

    root = node("r", 10)
    a, b = node("ra", 10, root), node("rb", 10, root)
    a1 = node("ra1", 10, a)
    store = ContextStore(4 * root.nbytes)
    for e in (root, a, b, a1):
        store.put(e)
    assert len(store) == 4 and store.nbytes == 4 * root.nbytes
    store.put(node("rc", 10, root))  # over budget: "rb" goes, the least recently used (a1's put used ra, r)
    assert store.get("rb") is None and all(store.get(t) for t in ("r", "ra", "ra1", "rc"))
    store.put(node("rb1", 10, b))  # its parent is gone: not stored
    assert store.get("rb1") is None
    store.put(node("rd", 10, root))  # "ra" is older than "rc", but its child "ra1" goes first
    assert store.get("ra1") is None and store.get("ra") is a and store.nbytes == 4 * root.nbytes
    store.put(node("big", 100, root))  # larger than the whole budget: not stored, nothing dropped
    store.put(node("ra", 5, root))  # already stored: the stored one stays
    assert store.get("big") is None and store.get("ra") is a and len(store) == 4


def test_write_kv_assembles_a_context_from_its_lineage_and_can_stop_early():
    # Token i's key (and value, negated) is i + 1 at every layer/head/dim, so positions are easy to read.
    def kv(lo, hi):
        keys = np.broadcast_to(np.arange(lo + 1, hi + 1, dtype=np.float32)[None, None, :, None], (2, 1, 3, hi - lo, 2))
        return np.stack([keys[0], -keys[1]])

    root = StoredContext("p", np.arange(5, dtype=np.int32), kv(0, 5))
    step = StoredContext("ps", np.arange(8, dtype=np.int32), kv(5, 8), parent=root)
    leaf = StoredContext("pst", np.arange(10, dtype=np.int32), kv(8, 10), parent=step)
    out = np.zeros((2, 2, 3, 12, 2), np.float32)
    leaf.write_kv(out[:, 1:], 12)  # a sub-view: layer 1 of a 2-layer buffer, the context ending at slot 12
    np.testing.assert_array_equal(out[0, 1, 0, :, 0], [0, 0] + list(range(1, 11)))
    np.testing.assert_array_equal(out[1, 1, 2, :, 1], [0, 0] + [-v for v in range(1, 11)])
    assert not out[:, 0].any()
    part = np.zeros((2, 1, 3, 7, 2), np.float32)
    leaf.write_kv(part, 7, length=6)  # the first 6 tokens, ending at slot 7: the root's and one of the step's
    np.testing.assert_array_equal(part[0, 0, 1, :, 0], [0, 1, 2, 3, 4, 5, 6])
