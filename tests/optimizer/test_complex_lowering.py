"""Complex rotary arithmetic rewritten as real ops: a table made with torch.polar, expanded, split and
unsqueezed (ops torch.onnx cannot translate on complex values), applied to q with a complex product; the
ONNX model matches PyTorch at a shape other than the traced one, and no complex value is left."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from kiln.optimizer.importers.complex_lowering import _is_complex, lower_complex  # noqa: E402


class Rotary(torch.nn.Module):
    def forward(self, q, positions):
        inverse = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
        angles = torch.outer(positions.double(), inverse)
        table = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # [S, 4]
        low, high = table.split_with_sizes([1, 3], dim=-1)
        table = torch.cat([low, high], dim=-1).unsqueeze(0).expand(q.shape[0], -1, -1).unsqueeze(2)  # [B, S, 1, 4]
        pairs = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * table).flatten(3)


def test_complex_rotary_exports_as_real_arithmetic(tmp_path):
    seq = torch.export.Dim("seq", min=2, max=64)
    q, positions = torch.randn(2, 5, 3, 8), torch.arange(5)
    ep = torch.export.export(Rotary(), (q, positions), dynamic_shapes=({1: seq}, {0: seq}), strict=False)
    ep, rewritten = lower_complex(ep)
    assert rewritten >= 8
    assert not any(_is_complex(n.meta.get("val")) for n in ep.graph.nodes)
    torch.onnx.export(ep, dynamo=True).save(str(tmp_path / "rotary.onnx"))

    q, positions = torch.randn(2, 11, 3, 8), torch.arange(3, 14)
    session = ort.InferenceSession(str(tmp_path / "rotary.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (q.numpy(), positions.numpy()))))[0]
    np.testing.assert_allclose(got, Rotary()(q, positions).numpy(), rtol=1e-5, atol=1e-5)
