"""Network Dissection (Bau, Zhou, Khosla, Oliva, Torralba, CVPR 2017), as in the NetDissect-Lite reference.

A unit's map is upsampled bilinearly to the segmentation resolution and thresholded at the unit's top-0.5%
activation quantile (computed on the maps at their own resolution, before upsampling). The active mask is
compared with every concept's mask over the whole dataset:

    IoU(unit, concept) = sum_images |active AND concept| / sum_images |active OR concept|

where the active area in the union is counted only in images in which the concept's category is annotated
(NetDissect-Lite's ``tally_units_cat``). A unit is a detector ("interpretable") when its best IoU >= 0.04.

This module holds the per-batch counting helpers that the extraction engine calls (`iou_counts_from_maps`, which
gives `iou_counts` of `threshold_and_upsample` while resizing only the maps that can fire; `overlap_counts`;
compexp reuses them) and the labeler that turns the dataset-wide counts (`MaskCounts`) into ranked labels.

Differences from the reference, on purpose:
- NetDissect-Lite decides whether the active area of an image counts for category k by whether some active
  pixel lies on a label of category k (or the image has an image-level label of k); we count it when category k
  is annotated in the image at all, as the paper describes ("in images where the category is annotated").
- NetDissect-Lite writes one label per unit (the best over categories); we keep the `top_n` best concepts over
  all chosen categories, and drop concepts with IoU 0.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

from labelers.base import (
    Concept,
    Input,
    Label,
    Labeler,
    LabelerError,
    LabelerInputs,
    LabelingResult,
    MaskCounts,
    Param,
    Progress,
    register,
)

log = logging.getLogger(__name__)

# float32 holds every integer up to 2**24 exactly; no single product of 0/1 matrices may count more pixels.
_MAX_EXACT_PIXELS = 2**24
_DEFAULT_BUDGET = 256 * 2**20
_CPU_TEMP_TARGET = 24 * 2**20
# Cost of one gathered element relative to one multiply-add of a dense product, measured here on 2 CPU cores at
# the chunk size below (dense sgemm ~0.02 ns per multiply-add, gather + index_add ~2.5 ns per element, plus a
# transposed copy of the other side that costs about as much as gathering every pixel once). Tuned on CPU; the CUDA
# value is a guess (dense half-precision products are relatively cheaper there). Both branches are exact.
_GATHER_COST_CPU = 128.0
_GATHER_COST_CUDA = 256.0


def count_rows(m: torch.Tensor) -> torch.Tensor:
    """Number of true entries in each row of a bool matrix [R, n] -> int64 [R].

    On CPU, reductions over bool bytes are not vectorised (about 6 ns per element here); summing the same bytes
    read as int64 words is ~30x faster. Up to 255 words are added per byte lane before any lane can carry, then the
    lanes are added up."""
    if m.dim() != 2:
        raise ValueError(f"count_rows needs a [R, n] mask, got {tuple(m.shape)}")
    m = m if m.dtype == torch.bool else m != 0
    R, n = m.shape
    if m.is_cuda or R == 0 or n < 64:
        return m.sum(1, dtype=torch.int64)
    full = n - n % 8
    words = m[:, :full]
    if not words.is_contiguous():
        words = words.contiguous()
    w = words.view(torch.uint8).view(torch.int64)  # [R, full / 8], eight 0/1 bytes per word
    nw = w.shape[1]
    k = nw // 255
    parts = []
    if k:
        parts.append(w[:, :k * 255].reshape(R, k, 255).sum(2))
    if nw > k * 255:
        parts.append(w[:, k * 255:].sum(1, keepdim=True))
    lanes = torch.cat(parts, 1) if len(parts) > 1 else parts[0]  # every byte lane <= 255: no carries
    out = lanes.contiguous().view(torch.uint8).view(R, -1).sum(1, dtype=torch.int64)
    if full < n:
        out += m[:, full:].sum(1, dtype=torch.int64)
    return out


def pixels_per_chunk(per_pixel_bytes: int, budget_bytes: int, on_cuda: bool) -> int:
    """Pixels per chunk so the temporaries fit the budget. On CPU also keep each temporary near 24 MB: larger
    ones are fresh mmap'ed memory whose page faults cost more than the arithmetic on it."""
    limit = budget_bytes if on_cuda else min(budget_bytes, _CPU_TEMP_TARGET)
    return int(max(256, min(_MAX_EXACT_PIXELS, limit // max(1, per_pixel_bytes))))


def _dense_counts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[R, n] bool x [C, n] bool -> [R, C] float32 counts by one matrix product (exact: 0/1 inputs, fp32 sums)."""
    if a.is_cuda:
        # Half inputs are exact for 0/1 and twice as fast; the sums must stay in float32 (half stops being exact
        # at 2048), which `out_dtype` provides on CUDA builds that have it.
        try:
            return torch.mm(a.half(), b.half().T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float().T


def _gather_counts(a: torch.Tensor, b: torch.Tensor, budget: int) -> torch.Tensor:
    """Same result as `_dense_counts`, summing for each true entry of `a` the column of `b` at its pixel.

    Costs nnz(a) x C instead of R x n x C: the win when `a` is sparse (a unit active on 0.5% of pixels)."""
    r_idx, p_idx = a.nonzero(as_tuple=True)
    b_t = b.T.contiguous()  # [n, C]: rows gathered per pixel are contiguous
    out = torch.zeros((a.shape[0], b.shape[0]), dtype=torch.float32, device=a.device)
    step = max(1, budget // max(1, 4 * b.shape[0]))
    for s in range(0, r_idx.numel(), step):
        # (advanced indexing: index_select on bool tensors is ~50x slower on CPU)
        rows = b_t[p_idx[s:s + step]].float()
        out.index_add_(0, r_idx[s:s + step], rows)
    return out


def overlap_counts(a: torch.Tensor, b: torch.Tensor, budget_bytes: int = _DEFAULT_BUDGET) -> torch.Tensor:
    """|a_r AND b_c| for every row r of `a` [R, N] and row c of `b` [C, N] (bool, same device) -> [R, C] float64.

    A product over pixels: a dense matrix product, or, when one side is sparse enough that it is cheaper, a
    gather over its true entries. Pixels are taken in chunks so temporaries stay near `budget_bytes` and every
    partial sum stays exact in float32; the chunks are summed in float64.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"overlap_counts needs [R, N] and [C, N] masks, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a if a.dtype == torch.bool else a != 0
    b = b if b.dtype == torch.bool else b != 0
    R, N = a.shape
    C = b.shape[0]
    total = torch.zeros((R, C), dtype=torch.float64, device=a.device)
    if R == 0 or C == 0 or N == 0:
        return total
    gather_cost = _GATHER_COST_CUDA if a.is_cuda else _GATHER_COST_CPU
    # dense temporaries: float copies of both sides
    step = min(N, pixels_per_chunk(4 * max(R, C), budget_bytes, a.is_cuda))
    for s in range(0, N, step):
        ac, bc = a[:, s:s + step], b[:, s:s + step]
        if step < N:
            ac, bc = ac.contiguous(), bc.contiguous()
        n = ac.shape[1]
        nnz_a = int(count_rows(ac).sum())
        nnz_b = int(count_rows(bc).sum())
        if nnz_a == 0 or nnz_b == 0:
            continue
        cost_dense = float(R) * n * C
        cost_a = gather_cost * (nnz_a + n) * C
        cost_b = gather_cost * (nnz_b + n) * R
        if cost_dense <= min(cost_a, cost_b):
            part = _dense_counts(ac, bc)
        elif cost_a <= cost_b:
            part = _gather_counts(ac, bc, budget_bytes)
        else:
            part = _gather_counts(bc, ac, budget_bytes).T
        total += part.double()
    return total


# Bilinear resizing makes every output pixel a convex combination of input pixels, so a resized map can exceed a
# threshold only if its maximum can. Float rounding can lift a computed combination above the true one by a few
# ulp of the largest magnitude involved (~1e-7 relative); this margin covers that a thousand times over.
_ROUNDING_MARGIN = 1e-4


def may_fire(maps: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Unit maps [B, U, h, w] -> [B, U] bool: the maps that can have a pixel above their unit's threshold once
    bilinearly resized (to any size). A map left out is all False after `threshold_and_upsample`, for certain."""
    B, U = maps.shape[:2]
    flat = maps.reshape(B, U, -1)
    if flat.shape[2] == 0:
        return torch.zeros((B, U), dtype=torch.bool, device=maps.device)
    low, top = torch.aminmax(flat, dim=2)
    top = top.float()
    big = torch.maximum(top.abs(), low.float().abs())
    thr = thresholds.to(device=maps.device, dtype=torch.float32).view(1, U)
    # Written as "not certainly below" so that NaN and infinite maps count as candidates and go the full way.
    return ~(top + _ROUNDING_MARGIN * big < thr)


# PyTorch's CPU kernel resizes the channels of a tensor in groups of its float vector width (8 with AVX2, 16 with
# AVX-512) and the channels left over one by one, and the two round the last bit differently. Padding the selected
# maps to a multiple of the widest width puts every map in a full group: its result then does not depend on which
# other maps are resized with it, and equals the whole-layer resize for layers whose unit count is a multiple of
# the vector width.
_VECTOR_LANES = 16


def _upsample_selected(maps: torch.Tensor, b: torch.Tensor, u: torch.Tensor, thr: torch.Tensor,
                       size: tuple[int, int]) -> torch.Tensor:
    """The active masks [k, H, W] of the maps (b[i], u[i]): bilinear resizing (`threshold_and_upsample`), then
    `> thr[u[i]]`."""
    part = maps[b, u].float()  # [k, h, w]
    k = part.shape[0]
    if tuple(part.shape[1:]) != tuple(size):
        pad = -k % _VECTOR_LANES
        if pad:
            part = torch.cat([part, part.new_zeros((pad, *part.shape[1:]))])
        part = F.interpolate(part[None], size=size, mode="bilinear", align_corners=False)[0, :k]
    return part > thr[u].view(-1, 1, 1)


def threshold_and_upsample(
    maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int], budget_bytes: int = _DEFAULT_BUDGET
) -> torch.Tensor:
    """Unit maps [B, U, h, w] -> active masks [B, U, H, W] bool: bilinear upsampling, then `> threshold[u]`.

    NetDissect-Lite resizes each map with PIL's bilinear filter (``scipy.misc.imresize(..., mode='F')``), which
    for enlargement samples at pixel centres with clamped edges: the same as ``F.interpolate(..., 'bilinear',
    align_corners=False)``. The comparison is strict, as in the reference. Only the maps that can fire
    (`may_fire`) are resized: at a top-quantile threshold most are certainly all False. Maps are processed in
    chunks so the float copy stays near `budget_bytes`.
    """
    if maps.dim() != 4:
        raise ValueError(f"threshold_and_upsample needs maps [B, U, h, w], got {tuple(maps.shape)}")
    B, U = maps.shape[:2]
    H, W = int(size[0]), int(size[1])
    if thresholds.shape != (U,):
        raise ValueError(f"need one threshold per unit ({U}), got shape {tuple(thresholds.shape)}")
    thr = thresholds.to(device=maps.device, dtype=torch.float32)
    out = torch.zeros((B, U, H, W), dtype=torch.bool, device=maps.device)
    if B == 0 or U == 0:
        return out
    bi, ui = may_fire(maps, thr).nonzero(as_tuple=True)
    step = max(1, budget_bytes // max(1, H * W * 4))
    for s in range(0, bi.numel(), step):
        b, u = bi[s:s + step], ui[s:s + step]
        out[b, u] = _upsample_selected(maps, b, u, thr, (H, W))
    return out


def _check_categories(B: int, C: int, category_annotated: torch.Tensor, concept_category: torch.Tensor) -> None:
    """The per-image annotated categories [B, K] and per-concept category [C] the overlap counts need."""
    if category_annotated.dim() != 2 or category_annotated.shape[0] != B:
        raise ValueError(f"category_annotated must be [B={B}, K], got {tuple(category_annotated.shape)}")
    if concept_category.shape != (C,):
        raise ValueError(f"concept_category must be [C={C}], got {tuple(concept_category.shape)}")


def iou_counts_from_maps(
    maps: torch.Tensor,
    thresholds: torch.Tensor,
    size: tuple[int, int],
    concept_masks: torch.Tensor,
    category_annotated: torch.Tensor,
    concept_category: torch.Tensor,
    budget_bytes: int = _DEFAULT_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iou_counts(threshold_and_upsample(maps, thresholds, size), concept_masks, ...)``: the same counts, bit
    for bit, without building the [B, U, H, W] active masks. Only the maps that can fire (`may_fire`; at the
    top-0.5% threshold a minority) are resized and counted against their own image's concept masks, so the cost
    follows the number of such maps, not B x U."""
    if maps.dim() != 4 or concept_masks.dim() != 4:
        raise ValueError(f"iou_counts_from_maps needs maps [B, U, h, w] and masks [B, C, H, W], got "
                         f"{tuple(maps.shape)} and {tuple(concept_masks.shape)}")
    B, U = maps.shape[:2]
    H, W = int(size[0]), int(size[1])
    C = concept_masks.shape[1]
    if thresholds.shape != (U,):
        raise ValueError(f"need one threshold per unit ({U}), got shape {tuple(thresholds.shape)}")
    if concept_masks.shape[0] != B or tuple(concept_masks.shape[2:]) != (H, W):
        raise ValueError(f"maps {tuple(maps.shape)} and concept masks {tuple(concept_masks.shape)} differ")
    _check_categories(B, C, category_annotated, concept_category)
    device = maps.device
    cm = concept_masks.to(device)
    cm = cm if cm.dtype == torch.bool else cm != 0
    annotated = category_annotated.to(device=device, dtype=torch.bool)
    if C:
        concept_ok = annotated[:, concept_category.to(device=device, dtype=torch.int64)]  # [B, C]
        if not bool(concept_ok.all()):
            cm = cm & concept_ok[:, :, None, None]
    concept_area = count_rows(cm.reshape(B * C, H * W)).view(B, C).sum(0).to(torch.float64)
    inter = torch.zeros((U, C), dtype=torch.float64, device=device)
    active_per_image = torch.zeros((B, U), dtype=torch.float64, device=device)
    if B and U:
        thr = thresholds.to(device=device, dtype=torch.float32)
        bi, ui = may_fire(maps, thr).nonzero(as_tuple=True)  # row-major: each image's maps are consecutive
        # 0/1 products summed in float32 are exact up to 2**24 pixels per image
        dtype = torch.float32 if H * W < _MAX_EXACT_PIXELS else torch.float64
        flat_masks = cm.reshape(B, C, H * W)
        limit = budget_bytes if device.type == "cuda" else min(budget_bytes, _CPU_TEMP_TARGET)
        # the masks as numbers once for all images when that fits the budget, else image by image
        masks_f = flat_masks.to(dtype) if C and B * C * H * W * 4 <= limit else None
        step = max(1, limit // max(1, H * W * 4))
        for s in range(0, bi.numel(), step):
            b, u = bi[s:s + step], ui[s:s + step]
            act = _upsample_selected(maps, b, u, thr, (H, W)).reshape(len(b), H * W)
            active_per_image[b, u] = count_rows(act).to(torch.float64)
            if not C:
                continue
            act_f = act.to(dtype)
            per = torch.empty((len(b), C), dtype=dtype, device=device)
            # one product per image: its active maps against its own concept masks
            images, counts = torch.unique_consecutive(b, return_counts=True)
            start = 0
            for img, n in zip(images.tolist(), counts.tolist()):
                m = masks_f[img] if masks_f is not None else flat_masks[img].to(dtype)
                per[start:start + n] = act_f[start:start + n] @ m.T
                start += n
            inter.index_add_(0, u, per.to(torch.float64))
    unit_area = active_per_image.T @ annotated.to(torch.float64)  # [U, K]
    return inter, unit_area, concept_area


def iou_counts(
    unit_masks: torch.Tensor,
    concept_masks: torch.Tensor,
    category_annotated: torch.Tensor,
    concept_category: torch.Tensor,
    budget_bytes: int = _DEFAULT_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's contribution to `MaskCounts` (sum the results over batches).

    unit_masks [B, U, H, W] bool, concept_masks [B, C, H, W] bool, category_annotated [B, K] bool,
    concept_category [C] int (index into the K categories). Returns float64 tensors on the input device:
    intersection [U, C] = sum_b |active AND concept|, unit_area [U, K] = active pixels summed over the images
    where category k is annotated, concept_area [C] = concept pixels. Concept pixels in an image where the
    concept's category is not annotated are ignored, so that intersection <= union always holds.
    """
    if unit_masks.dim() != 4 or concept_masks.dim() != 4:
        raise ValueError(
            f"iou_counts needs [B, U, H, W] and [B, C, H, W] masks, got {tuple(unit_masks.shape)} "
            f"and {tuple(concept_masks.shape)}"
        )
    B, U, H, W = unit_masks.shape
    C = concept_masks.shape[1]
    if concept_masks.shape[0] != B or concept_masks.shape[2:] != (H, W):
        raise ValueError(f"unit masks {tuple(unit_masks.shape)} and concept masks {tuple(concept_masks.shape)} differ")
    _check_categories(B, C, category_annotated, concept_category)
    device = unit_masks.device
    unit_masks = unit_masks if unit_masks.dtype == torch.bool else unit_masks != 0
    concept_masks = concept_masks.to(device)
    concept_masks = concept_masks if concept_masks.dtype == torch.bool else concept_masks != 0
    annotated = category_annotated.to(device=device, dtype=torch.bool)
    concept_category = concept_category.to(device=device, dtype=torch.int64)

    if C:
        concept_ok = annotated[:, concept_category]  # [B, C]
        if not bool(concept_ok.all()):
            concept_masks = concept_masks & concept_ok[:, :, None, None]

    active_per_image = count_rows(unit_masks.reshape(B * U, H * W)).view(B, U).to(torch.float64)
    unit_area = active_per_image.T @ annotated.to(torch.float64)  # [U, K]
    concept_area = count_rows(concept_masks.reshape(B * C, H * W)).view(B, C).sum(0).to(torch.float64)  # [C]
    intersection = torch.zeros((U, C), dtype=torch.float64, device=device)
    if U == 0 or C == 0 or B == 0:
        return intersection, unit_area, concept_area

    # Pixels of a few images at a time, laid out [U, pixels] and [C, pixels] for the product.
    per_image = (U + C) * H * W * 2
    step = max(1, min(B, budget_bytes // max(1, per_image)))
    for s in range(0, B, step):
        a = unit_masks[s:s + step].transpose(0, 1).reshape(U, -1)
        c = concept_masks[s:s + step].transpose(0, 1).reshape(C, -1)
        intersection += overlap_counts(a, c, budget_bytes)
    return intersection, unit_area, concept_area


def select_concepts(concepts: list[Concept], categories: str, method: str) -> tuple[torch.Tensor, list[str]]:
    """Parse the comma-separated `categories` parameter -> ([C] bool: concept is in a chosen category, chosen).

    An empty value chooses every category the concepts have."""
    present = list(dict.fromkeys(c.category for c in concepts))
    wanted = [c.strip() for c in (categories or "").split(",") if c.strip()]
    if not wanted:
        chosen = present
    else:
        unknown = [c for c in wanted if c not in present]
        if unknown:
            raise LabelerError(
                f"{method}: parameter categories names {', '.join(repr(u) for u in unknown)}, which this dataset "
                f"does not have. Its categories are {', '.join(repr(p) for p in present) or 'none'}; "
                f"choose among them or leave the parameter empty for all."
            )
        chosen = list(dict.fromkeys(wanted))
    keep = set(chosen)
    return torch.tensor([c.category in keep for c in concepts], dtype=torch.bool), chosen


def pixel_iou_applies_to(grid: tuple[int, int] | None) -> str | None:
    """IoU methods compare where a unit fires inside an image with where a concept is: a 1x1 map fires on the whole
    image or not at all, so its "IoU" only restates image-level co-occurrence (INVERT measures that properly)."""
    if grid is None or int(grid[0]) * int(grid[1]) <= 1:
        return ("the layer's units have no spatial map (1x1): a pixel IoU would only restate whether the concept "
                "is in the image; use an image-level method such as INVERT")
    return None


def _check_counts(mc: MaskCounts, inputs: LabelerInputs, method: str) -> None:
    concepts = inputs.concepts or []
    U, C = mc.intersection.shape if mc.intersection.dim() == 2 else (-1, -1)
    problems = []
    if C != len(concepts):
        problems.append(f"{C} concepts in the counts but {len(concepts)} in the dataset")
    if U != inputs.num_units:
        problems.append(f"{U} units in the counts but {inputs.num_units} in layer {inputs.layer}")
    if mc.unit_area.shape != (max(U, 0), len(mc.categories)) or mc.concept_area.shape != (max(C, 0),):
        problems.append("unit or concept areas of the wrong shape")
    if mc.concept_category.shape != (max(C, 0),):
        problems.append("a concept-category index of the wrong length")
    if problems:
        raise LabelerError(
            f"{method}: the mask statistics of layer {inputs.layer} do not match the project ({'; '.join(problems)}). "
            f"They are probably from an older extraction: extract the layer again with mask statistics."
        )


@register
class NetDissect(Labeler):
    name = "netdissect"
    title = "Network Dissection"
    paper = (
        "Bau, Zhou, Khosla, Oliva, Torralba. Network Dissection: Quantifying Interpretability of Deep Visual "
        "Representations. CVPR 2017"
    )
    inputs = (Input.MASK_COUNTS,)
    applies_to = staticmethod(pixel_iou_applies_to)  # type: ignore[assignment]
    params = (
        Param(
            "iou_threshold", float, 0.04,
            "A unit is a detector (interpretable) when its best IoU is at least this (paper: 0.04).",
            minimum=0.0, maximum=1.0,
        ),
        Param("top_n", int, 5, "How many concepts to keep per unit, best IoU first.", minimum=1),
        Param(
            "categories", str, "",
            "Comma-separated concept categories to consider, e.g. 'object,part,scene,texture,color'; empty = all "
            "categories of the dataset. Note: the reference leaves Broden's 'material' out by default.",
        ),
        Param(
            "min_concept_pixels", int, 0,
            "Ignore concepts with fewer pixels than this over the whole dataset (0 = keep every concept that "
            "occurs; the reference keeps all).",
            minimum=0,
        ),
    )

    def run(self, inputs: LabelerInputs, params: dict[str, Any], progress: Progress) -> LabelingResult:
        mc = inputs.mask_counts
        concepts = inputs.concepts
        assert mc is not None and concepts is not None  # guaranteed by require()
        _check_counts(mc, inputs, self.name)
        progress.update(0, 1, "computing IoU of every unit with every concept")
        thr = float(params["iou_threshold"])
        top_n = int(params["top_n"])
        in_category, chosen = select_concepts(concepts, params["categories"], self.name)

        inter = mc.intersection.detach().to("cpu", torch.float64)
        counts = MaskCounts(
            intersection=inter,
            unit_area=mc.unit_area.detach().to("cpu", torch.float64),
            concept_area=mc.concept_area.detach().to("cpu", torch.float64),
            concept_category=mc.concept_category.detach().to("cpu", torch.int64),
            categories=mc.categories,
        )
        union = counts.union()
        iou = torch.where(union > 0, inter / union.clamp_min(1e-300), torch.zeros_like(union))
        allowed = in_category & (counts.concept_area > 0) & (counts.concept_area >= params["min_concept_pixels"])
        n_allowed = int(allowed.sum())
        U = inter.shape[0]
        labels: list[Label] = []
        best = torch.zeros(U, dtype=torch.float64)
        best_idx = torch.full((U,), -1, dtype=torch.int64)
        if n_allowed and U:
            masked = iou.masked_fill(~allowed[None, :], -1.0)
            vals, idx = masked.topk(min(top_n, n_allowed), dim=1)
            best, best_idx = vals[:, 0].clamp_min(0.0), idx[:, 0]
            inter_top = inter.gather(1, idx)
            union_top = union.gather(1, idx)
            for u, (row_v, row_i, row_in, row_un) in enumerate(
                zip(vals.tolist(), idx.tolist(), inter_top.tolist(), union_top.tolist())
            ):
                rank = 0
                for v, c, i_, un in zip(row_v, row_i, row_in, row_un):
                    if v <= 0.0:
                        break
                    rank += 1
                    labels.append(Label(
                        unit=u, rank=rank, text=concepts[c].name, score=float(v), category=concepts[c].category,
                        extra={"interpretable": bool(v >= thr), "intersection": float(i_), "union": float(un),
                               "concept_index": int(c)},
                    ))

        detectors = (best >= thr) & (best > 0)
        per_category: Counter[str] = Counter()
        unique: dict[str, set[str]] = {}
        for u in detectors.nonzero().flatten().tolist():
            c = concepts[int(best_idx[u])]
            per_category[c.category] += 1
            unique.setdefault(c.category, set()).add(c.name)
        summary = {
            "iou_threshold": thr,
            "categories": chosen,
            "concepts_considered": n_allowed,
            "units": U,
            "interpretable_units": int(detectors.sum()),
            "interpretable_per_category": {cat: per_category.get(cat, 0) for cat in chosen},
            "unique_detectors": sum(len(v) for v in unique.values()),
            "unique_detectors_per_category": {cat: len(unique.get(cat, ())) for cat in chosen},
        }
        log.info("netdissect %s: %d of %d units interpretable at IoU >= %g", inputs.layer,
                 summary["interpretable_units"], U, thr)
        progress.update(1, 1, "done")
        return LabelingResult(labels=labels, summary=summary)
