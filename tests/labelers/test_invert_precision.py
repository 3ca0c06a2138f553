"""INVERT's exact float32 products leave torch's matmul precision settings as they found them."""
import torch

from labelers.invert import exact_int_matmul


def test_exact_products_restore_every_backends_precision():
    knobs = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [k.fp32_precision for k in knobs]
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # the user's choice for their own CUDA work
        torch.backends.mkldnn.matmul.fp32_precision = "none"
        rows = torch.randint(0, 5000, (3, 50))
        presence = torch.rand(50, 4) > 0.5
        got = exact_int_matmul(rows, presence, float32=True)
        assert torch.equal(got, rows.double() @ presence.double())
        assert [k.fp32_precision for k in knobs] == ["tf32", "none"]
    finally:
        for k, v in zip(knobs, saved):
            k.fp32_precision = v
