import torch

from lethe.memorization.neighbors import nearest_neighbors


def test_chunked_equals_full_search():
    torch.manual_seed(0)
    queries, references = torch.randn(17, 3, 4, 4), torch.randn(1000, 3, 4, 4)
    d_full, i_full = nearest_neighbors(queries, references, k=5, chunk_size=10_000)
    d_chunk, i_chunk = nearest_neighbors(queries, references, k=5, chunk_size=7)
    assert torch.equal(i_full, i_chunk) and torch.allclose(d_full, d_chunk)
    brute = torch.cdist(queries.flatten(1), references.flatten(1)).topk(5, largest=False)
    assert torch.equal(i_full, brute.indices)


def test_exact_copy_is_its_own_nearest():
    torch.manual_seed(0)
    references = torch.randn(50, 1, 8, 8)
    d, i = nearest_neighbors(references[[3, 40]], references, k=2, chunk_size=16)
    assert i[:, 0].tolist() == [3, 40] and (d[:, 0] < 1e-3).all() and (d[:, 1] > 1).all()
