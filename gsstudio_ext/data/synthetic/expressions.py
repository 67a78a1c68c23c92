"""Templated referring expressions with exact targets, from the scene plan and per-frame visibility.

Spatial relations use one fixed reference frame, the world frame of :mod:`.layout`, seen by a viewer standing
on the -y side of the table and looking towards +y (orbit view 0 stands there): "left of" = smaller x, "right of"
= larger x, "in front of" = smaller y (closer to that viewer), "behind" = larger y. Relations compare object
bbox centres and need an offset above ``relation_margin``; an expression is only emitted when exactly one object
of the named category ("object" or a class) satisfies it and no candidate sits within the margin (so it is never
borderline).
Size compares bbox volumes and needs a ratio of at least :data:`SIZE_RATIO` to the runner-up.

Every record has the layout keys ``id, text, object_ids, kind, frames`` (frames = stems where a target covers at
least ``min_visible_pixels``) plus ``relation`` = ``{"type", "anchor_id", "category"}`` for size and spatial kinds.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from gsstudio_ext.data.synthetic.layout import SceneObject

SIZE_RATIO = 1.2
"""The largest (smallest) object must be this many times bigger (smaller) in bbox volume than the runner-up."""

REFERENCE_FRAME = {
    "up": "+z",
    "viewer": "on the -y side of the table, looking towards +y (orbit view 0)",
    "left": "-x",
    "right": "+x",
    "front": "-y",
    "behind": "+y",
    "compared": "bbox centres",
}
"""The fixed frame spatial relations are computed in (also written to scene.json)."""

ACCENT_WORDS = {"dark": "black", "wood": "wooden"}
"""How accent colours are said in paraphrases (others are said as named)."""

# relation type -> (axis, sign): o satisfies it w.r.t. anchor a when sign * (o[axis] - a[axis]) > margin
RELATIONS: Dict[str, Tuple[int, int]] = {
    "left_of": (0, -1),
    "right_of": (0, 1),
    "in_front_of": (1, -1),
    "behind": (1, 1),
}
RELATION_TEXT = {
    "left_of": "the {cat} to the left of the {anchor}",
    "right_of": "the {cat} to the right of the {anchor}",
    "in_front_of": "the {cat} in front of the {anchor}",
    "behind": "the {cat} behind the {anchor}",
}
# extreme type -> (axis, sign, text for "object", text for a class): the object maximising sign * coordinate
EXTREMES: Dict[str, Tuple[int, int, str, str]] = {
    "leftmost": (0, -1, "the leftmost object", "the left {cat}"),
    "rightmost": (0, 1, "the rightmost object", "the right {cat}"),
    "frontmost": (1, -1, "the object at the very front", "the front {cat}"),
    "backmost": (1, 1, "the object at the very back", "the back {cat}"),
}


def relation_holds(kind: str, obj: SceneObject, anchor: SceneObject, margin: float) -> bool:
    """Whether ``obj`` is ``kind`` (left_of, right_of, in_front_of, behind) of ``anchor`` by more than ``margin``."""
    axis, sign = RELATIONS[kind]
    return sign * (obj.center[axis] - anchor.center[axis]) > margin


def _unique_relation(kind: str, anchor: SceneObject, pool: Sequence[SceneObject], margin: float) -> Optional[int]:
    """Id of the only object of ``pool`` in relation ``kind`` to ``anchor``, if unambiguous."""
    axis, _ = RELATIONS[kind]
    others = [o for o in pool if o.id != anchor.id]
    if any(abs(o.center[axis] - anchor.center[axis]) <= margin for o in others):
        return None
    hits = [o.id for o in others if relation_holds(kind, o, anchor, margin)]
    return hits[0] if len(hits) == 1 else None


def _extreme(kind: str, pool: Sequence[SceneObject], margin: float) -> Optional[int]:
    axis, sign = EXTREMES[kind][:2]
    if len(pool) < 2:
        return None
    ranked = sorted(pool, key=lambda o: -sign * o.center[axis])
    if sign * (ranked[0].center[axis] - ranked[1].center[axis]) <= margin:
        return None
    return ranked[0].id


def _size_extreme(pool: Sequence[SceneObject], largest: bool) -> Optional[int]:
    if len(pool) < 2:
        return None
    ranked = sorted(pool, key=lambda o: -o.volume if largest else o.volume)
    big, small = (ranked[0].volume, ranked[1].volume) if largest else (ranked[1].volume, ranked[0].volume)
    return ranked[0].id if big >= SIZE_RATIO * small else None


def _candidates(objects: Sequence[SceneObject], margin: float) -> List[Dict[str, Any]]:
    """Every valid expression (before sampling), as dicts with text, object_ids, kind and optional relation."""
    out: List[Dict[str, Any]] = []
    colour_counts = Counter(o.colour for o in objects)
    by_class: Dict[str, List[SceneObject]] = {}
    for o in objects:
        by_class.setdefault(o.cls, []).append(o)

    def add(text: str, target: int, kind: str, relation: Optional[Dict[str, Any]] = None) -> None:
        rec: Dict[str, Any] = {"text": text, "object_ids": [target], "kind": kind}
        if relation is not None:
            rec["relation"] = relation
        out.append(rec)

    for o in objects:
        add(f"the {o.name}", o.id, "name")
    for o in objects:
        if sum(1 for x in objects if x.cls == o.cls and x.colour == o.colour) == 1:
            add(f"the {o.colour} {o.cls}", o.id, "colour")
        if colour_counts[o.colour] == 1:
            add(f"the {o.colour} object", o.id, "colour")

    for largest, word in ((True, "largest"), (False, "smallest")):
        target = _size_extreme(objects, largest)
        if target is not None:
            add(f"the {word} object", target, "size", {"type": word, "anchor_id": None, "category": "object"})
        for cls, pool in by_class.items():
            target = _size_extreme(pool, largest)
            if target is not None:
                adj = ("larger" if largest else "smaller") if len(pool) == 2 else word
                add(f"the {adj} {cls}", target, "size", {"type": word, "anchor_id": None, "category": cls})

    for kind, (axis, _sign, text_obj, text_cls) in EXTREMES.items():
        group = "left_right" if axis == 0 else "front_behind"
        target = _extreme(kind, objects, margin)
        if target is not None:
            add(text_obj, target, group, {"type": kind, "anchor_id": None, "category": "object"})
        for cls, pool in by_class.items():
            target = _extreme(kind, pool, margin) if len(pool) == 2 else None
            if target is not None:
                add(text_cls.format(cat=cls), target, group, {"type": kind, "anchor_id": None, "category": cls})

    for kind, (axis, _sign) in RELATIONS.items():
        group = "left_right" if axis == 0 else "front_behind"
        for anchor in objects:
            # "object" needs the relation to pick the target; a class name plus a true relation is also unique
            for cat, pool in [("object", list(objects)), *by_class.items()]:
                target = _unique_relation(kind, anchor, pool, margin)
                if target is None:
                    continue
                text = RELATION_TEXT[kind].format(cat=cat, anchor=anchor.name)
                add(text, target, group, {"type": kind, "anchor_id": anchor.id, "category": cat})
    return out


def _paraphrases(objects: Sequence[SceneObject]) -> List[Dict[str, Any]]:
    out = []
    for o in objects:
        texts = [f"the {o.cls} that is {o.colour}", f"the {o.colour} coloured {o.cls} on the table"]
        texts += [
            f"the {o.colour} {o.cls} with the {ACCENT_WORDS.get(accent, accent)} {part}"
            for part, accent in sorted(o.accents.items())
        ]
        if o.size != "medium":
            texts.append(f"the {o.size} {o.colour} {o.cls}")
        out.extend({"text": t, "object_ids": [o.id], "kind": "paraphrase"} for t in texts)
    return out


def _sample(items: List[Dict[str, Any]], limit: int, rng: np.random.Generator) -> List[Dict[str, Any]]:
    if len(items) <= limit:
        return items
    keep = sorted(rng.choice(len(items), size=limit, replace=False).tolist())
    return [items[i] for i in keep]


def build_expressions(
    objects: Sequence[SceneObject],
    visible_frames: Callable[[int], List[str]],
    rng: np.random.Generator,
    margin: float,
    max_relational: int,
    max_paraphrases: int,
) -> List[Dict[str, Any]]:
    """Referring expressions of a scene, in a deterministic order, with ids 0..N-1.

    Args:
        objects: the scene objects (with bboxes and names).
        visible_frames: object id -> stems of the frames where it is visible.
        rng: seeded generator used to pick which relational and paraphrase expressions to keep.
        margin: relation margin in metres.
        max_relational: cap on left_right and on front_behind expressions (each).
        max_paraphrases: cap on paraphrase expressions.
    """
    candidates = _candidates(objects, margin)
    kept: List[Dict[str, Any]] = []
    for kind in ("name", "colour", "size"):
        kept += [c for c in candidates if c["kind"] == kind]
    for kind in ("left_right", "front_behind"):
        kept += _sample([c for c in candidates if c["kind"] == kind], max_relational, rng)
    kept += _sample(_paraphrases(objects), max_paraphrases, rng)

    records: List[Dict[str, Any]] = []
    seen = set()
    for c in kept:
        frames = sorted({f for t in c["object_ids"] for f in visible_frames(t)})
        if c["text"] in seen or not frames:
            continue
        seen.add(c["text"])
        rec = {
            "id": len(records),
            "text": c["text"],
            "object_ids": c["object_ids"],
            "kind": c["kind"],
            "frames": frames,
        }
        if "relation" in c:
            rec["relation"] = c["relation"]
        records.append(rec)
    return records
