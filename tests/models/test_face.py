"""models/face.py: the embedding's whitening (model.whiten), against plain references."""
import torch
import torch.nn.functional as F

from danlu.models import create_model
from danlu.models.face import within_class_whitening


def _people(n_people=6, per=8, dim=16, nuisance=3.0, seed=0):
    """Unit embeddings of n_people, whose photos vary mostly along one direction shared by everyone (as lighting
    does), and labels."""
    axis = F.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(99)), dim=0)  # the same for all
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_people, dim, generator=g)
    e = centres.repeat_interleave(per, 0) + nuisance * torch.randn(n_people * per, 1, generator=g) * axis \
        + 0.1 * torch.randn(n_people * per, dim, generator=g)
    return F.normalize(e, dim=1), torch.arange(n_people).repeat_interleave(per)


def test_whitening_makes_the_within_class_covariance_the_identity():
    e, y = _people()
    mean, matrix = within_class_whitening(e, y, shrink=0.0)
    assert torch.allclose(mean, e.mean(0), atol=1e-6)
    centred = torch.cat([e[y == c] - e[y == c].mean(0) for c in range(6)]).double()
    w = centred.T @ centred / len(centred)  # the plain within-class covariance
    m = matrix.double()
    assert torch.allclose(m @ w @ m, torch.eye(16, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(m, m.T, atol=1e-6)
    _, shrunk = within_class_whitening(e, y, shrink=0.3)  # shrinkage: W + 0.3 * mean eigenvalue * I
    ws = w + 0.3 * w.trace() / 16 * torch.eye(16, dtype=torch.float64)
    assert torch.allclose(shrunk.double() @ ws @ shrunk.double(), torch.eye(16, dtype=torch.float64), atol=1e-4)


def test_whitened_embeddings_bring_one_persons_photos_together():
    e, y = _people()
    mean, matrix = within_class_whitening(e, y, shrink=0.3)
    test, ty = _people(seed=1)  # other people, the same kind of variation
    same = ty[:, None] == ty[None, :]

    def gap(x):  # mean cosine of same-person pairs minus that of different-person pairs
        s = x @ x.T
        return (s[same & ~torch.eye(len(x), dtype=torch.bool)].mean() - s[~same].mean()).item()

    whitened = F.normalize((test - mean) @ matrix, dim=1)
    assert gap(whitened) > gap(test) + 0.2, (gap(whitened), gap(test))


def test_embed_applies_the_whitening_until_it_is_removed():
    torch.manual_seed(0)
    model = create_model("mobilefacenet", num_classes=5, head="arcface", embedding_dim=16,
                         width_mult=0.25).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = model.embed(x)
        assert torch.allclose(plain, model.unit_embed(x)) and not model.whitened
        mean, matrix = torch.randn(16), torch.randn(16, 16)
        model.set_whitening(mean, matrix)
        assert model.whitened
        assert torch.allclose(model.embed(x), F.normalize((plain - mean) @ matrix, dim=1), atol=1e-6)
        assert "whiten_matrix" not in model.state_dict()  # kept beside the weights, not in them
        model.set_whitening(None, None)
        assert torch.allclose(model.embed(x), plain)
