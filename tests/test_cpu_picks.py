"""Beam search's and greedy search's ops among the CPU kernels (llmbench/backends/cpu_gemv_beams.h, cpu_gemv_argmax.h):
the cache's rows reordered in place, each beam's best candidates, the greedy pick, against torch's own."""

import pytest
import torch


def test_reorder_rows_gathers_every_tensor_in_place(ops):
    """Beam search's cache reorder: row i of each tensor becomes its row source[i], as index_select gives."""
    torch.manual_seed(0)
    tensors = [torch.randn(4, 3, 5, 8).to(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    tensors.append(torch.randn(4, 7))
    for source in ([0, 0, 2, 1], [3, 2, 1, 0], [0, 1, 2, 3], [1, 1, 1, 1]):
        source = torch.tensor(source)
        expected = [t.index_select(0, source) for t in tensors]
        addresses = [t.data_ptr() for t in tensors]
        ops.reorder_rows(tensors, source)
        assert all(torch.equal(t, e) for t, e in zip(tensors, expected))
        assert [t.data_ptr() for t in tensors] == addresses  # in place: compiled steps keep reading these
    with pytest.raises(RuntimeError, match="source row 4 out of 4"):
        ops.reorder_rows(tensors, torch.tensor([0, 1, 2, 4]))
    # positions [start, end) of dim 2 only (beam search's generated positions): the others stay as they were
    caches = [torch.randn(4, 3, 10, 8).to(dtype) for dtype in (torch.float32, torch.bfloat16)]
    source = torch.tensor([1, 1, 3, 2])
    expected = [c.clone() for c in caches]
    for e in expected:
        e[:, :, 6:9] = e[:, :, 6:9].index_select(0, source)
    ops.reorder_rows(caches, source, 6, 9)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected))
    with pytest.raises(RuntimeError, match=r"positions \[6, 11\) need 4-D tensors that hold them"):
        ops.reorder_rows(caches, source, 6, 11)
    with pytest.raises(RuntimeError, match="need 4-D tensors"):
        ops.reorder_rows([torch.randn(4, 7)], source, 0, 2)
    with pytest.raises(RuntimeError, match="contiguous on cpu with 4 rows"):
        ops.reorder_rows([torch.randn(4, 6)[:, ::2]], torch.tensor([1, 0, 2, 3]))


def test_reorder_rows_with_writers_copies_only_what_differs(ops):
    """Beam search's steps with `writers`: each step writes its position of every row, then the rows are reordered;
    the caches end as reordering every generated position gives, while positions a row already holds from the same
    writer are not copied."""
    torch.manual_seed(0)
    rows, start, steps = 6, 3, 12
    caches = [torch.randn(rows, 2, start + steps, 8).to(dtype) for dtype in (torch.float32, torch.bfloat16)]
    expected = [c.clone() for c in caches]
    writers = torch.full((rows, steps), -7, dtype=torch.long)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        for tensors in (caches, expected):  # the step writes its position in every row
            for t in tensors:
                t[:, :, start + step] = torch.arange(rows).view(rows, 1, 1) * 100 + step
        source = torch.randint(0, rows, (rows,), generator=generator)
        if step % 4 == 3:
            source = torch.arange(rows)  # nothing moves
        ops.reorder_rows(caches, source, start, start + step + 1, writers)
        for e in expected:
            e[:, :, start:start + step + 1] = e[:, :, start:start + step + 1].index_select(0, source)
        assert all(torch.equal(c, e) for c, e in zip(caches, expected)), step
        assert writers[:, step].tolist() == source.tolist()  # the step's writer of each row's position
    # positions a row holds from its source's writer are skipped: row 0 keeps position 0 (both hold row 0's write)
    cache = torch.stack([torch.zeros(1, 3, 4), torch.ones(1, 3, 4)])
    two = torch.tensor([[0, 0, -1], [0, 1, -1]])  # the op notes position 2's writers itself
    ops.reorder_rows([cache], torch.tensor([1, 1]), 0, 3, two)
    assert cache[0, 0, :, 0].tolist() == [0.0, 1.0, 1.0] and cache[1].eq(1).all()
    assert two.tolist() == [[0, 1, 1], [0, 1, 1]]
    with pytest.raises(RuntimeError, match="writers must be a contiguous int64 tensor of 6 rows and at least 13"):
        ops.reorder_rows([torch.zeros(rows, 1, 20, 4)], torch.arange(rows), start, start + 13, writers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, vocab", [(1, 40000), (8, 49152), (3, 37)])
def test_argmax_rows_picks_as_torch_argmax(ops, dtype, rows, vocab):
    """Greedy steps' pick: argmax of float32(logits) + bias per row, the first of equal values, the first NaN."""
    torch.manual_seed(0)
    for case in ("random", "ties", "nan", "all -inf", "rounded", "bias"):
        x = torch.randn(rows, vocab).to(dtype)
        if case == "ties":
            x[:, vocab // 2] = x[:, -1] = 100
        elif case == "nan":
            x[:, -3] = x[:, 7] = float("nan")
        elif case == "all -inf":
            x.fill_(float("-inf"))
        elif case == "rounded":  # many equal values across the threads' parts
            x = x.round()
        bias = None
        if case == "bias":  # the best of every row forbidden, as EOS is
            bias = torch.zeros(vocab)
            bias[x.float().argmax(-1)] = float("-inf")
        expected = (x.float() + (0 if bias is None else bias)).argmax(-1, keepdim=True)
        assert torch.equal(ops.argmax_rows(x, bias), expected), case
    prefill = torch.randn(rows, 3, vocab).to(dtype)  # a prefill's last position: rows apart
    assert torch.equal(ops.argmax_rows(prefill[:, -1, :], None), prefill[:, -1, :].float().argmax(-1, keepdim=True))
    # leading dimensions are rows (torch 2.8 hands over an all-reduce's (rows, 1, vocab) buffer, not its view)
    assert torch.equal(ops.argmax_rows(prefill[:, -1:, :].contiguous(), None),
                       prefill[:, -1, :].float().argmax(-1, keepdim=True))
    with pytest.raises(RuntimeError, match="one value per column"):
        ops.argmax_rows(x, torch.zeros(vocab + 1))


@pytest.mark.parametrize("rows, vocab, k", [(4, 49152, 4), (8, 49152, 8), (3, 37, 5), (1, 7, 7), (2, 40000, 64)])
def test_topk_rows_picks_each_beams_best_candidates_as_torch_topk(ops, rows, vocab, k):
    """Beam search's first choice: the k largest of log-probabilities plus the beam's score per row, largest first,
    as torch.topk gives them; equal sums in column order (threads' parts included); NaN as torch.topk treats it."""
    torch.manual_seed(rows + k)
    for case in ("random", "ties", "all -inf", "nan"):
        x = torch.randn(rows, vocab).log_softmax(-1)
        if case == "ties":  # equal sums across the threads' parts: the lower column first
            x = x.round()
        elif case == "all -inf":
            x.fill_(float("-inf"))
        elif case == "nan":
            x[:, vocab // 3] = float("nan")
        offset = torch.randn(rows) * 3
        values, indices = ops.topk_rows(x, offset, k)
        sums = x + offset[:, None]
        expected_values, expected_indices = torch.topk(sums, k, dim=1)
        assert torch.equal(values, expected_values) or (case == "nan" and torch.equal(values.isnan(),
                                                                                   expected_values.isnan())), case
        if case in ("ties", "all -inf"):  # torch.topk leaves the order of equal values open: the lowest columns
            order = torch.sort(-sums, dim=1, stable=True).indices[:, :k]
            assert torch.equal(indices, order), case
        else:
            assert torch.equal(indices, expected_indices), case
        assert torch.equal(sums.gather(1, indices), values) or case == "nan", case
    padded = torch.randn(rows, vocab + 5)[:, :vocab]  # rows apart, as a view of a wider tensor
    assert torch.equal(ops.topk_rows(padded, torch.zeros(rows), k)[1], padded.topk(k, dim=1).indices)


def test_topk_rows_refuses_bad_calls(ops):
    x = torch.randn(2, 100)
    with pytest.raises(RuntimeError, match="k must be 1 to 64, got 65"):
        ops.topk_rows(x, torch.zeros(2), 65)
    with pytest.raises(RuntimeError, match="offset must be float32 with one value per row"):
        ops.topk_rows(x, torch.zeros(3), 4)
    with pytest.raises(RuntimeError, match="scores must be float32, bfloat16 or float16"):
        ops.topk_rows(x.to(torch.int32), torch.zeros(2), 4)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32 vector of one value per column"):
        ops.topk_rows(x, torch.zeros(2), 4, torch.zeros(99))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, vocab, k", [(4, 49152, 4), (3, 37, 5), (2, 40000, 64)])
def test_topk_rows_normalizes_logits_as_log_softmax(ops, dtype, rows, vocab, k):
    """normalize: the head's logits in their own dtype, taken to float32 log-probabilities first (EOS forbidden by the
    bias), as beam search asks: the same picks as torch's log_softmax, add and topk, the sums within float32 rounding
    of the exponentials; a row holding NaN or +inf gets torch's answer."""
    torch.manual_seed(rows + k)
    logits = (torch.randn(rows, vocab) * 4).to(dtype)
    bias = torch.zeros(vocab)
    bias[[1, vocab // 2]] = float("-inf")
    offset = torch.randn(rows) * 3
    for b in (None, bias):
        values, indices = ops.topk_rows(logits, offset, k, b, True)
        sums = logits.float().log_softmax(-1) + (0 if b is None else b) + offset[:, None]
        expected_values = sums.topk(k, dim=1).values  # equal 16-bit logits: lower columns first
        assert torch.equal(indices, torch.sort(-sums, dim=1, stable=True).indices[:, :k])
        torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-5)
        assert b is None or not set(indices.flatten().tolist()) & {1, vocab // 2}
    for bad in (float("nan"), float("inf")):
        odd = logits.clone()
        odd[0, vocab // 3] = bad
        values, indices = ops.topk_rows(odd, offset, k, None, True)
        expected = (odd.float().log_softmax(-1) + offset[:, None]).topk(k, dim=1)
        assert torch.equal(values.isnan(), expected.values.isnan()) and torch.equal(indices[1:], expected.indices[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, beams, vocab", [(1, 4, 49152), (2, 4, 1000), (3, 2, 37), (1, 1, 50), (2, 8, 300)])
def test_beam_choose_takes_a_beam_search_step_as_torch_ops_do(ops, dtype, batch, beams, vocab):
    """One step's choice in one call: each prompt's best `beams` of its beams' log-probabilities plus their scores
    (EOS forbidden by the bias), the rows they continue, their tokens, the new scores, and the sequences' rows taken
    from the rows they continue with the new token written, as the torch ops of the loop give them."""
    torch.manual_seed(batch * 100 + beams)
    rows, column = batch * beams, 6
    logits = (torch.randn(rows, vocab) * 3).to(dtype)
    logits[1 % rows] = logits[0]  # equal sums in two beams (their scores equal below): the lower beam first
    bias = torch.zeros(vocab)
    bias[vocab // 2] = float("-inf")
    scores = torch.randn(rows) * 2
    scores[1 % rows] = scores[0]
    sequences = torch.randint(0, vocab, (rows, column + 3))
    sums = logits.float().log_softmax(-1) + bias + scores[:, None]
    per_beam = torch.sort(-sums, dim=1, stable=True).indices[:, :beams].contiguous()  # lower columns first
    candidates = sums.gather(1, per_beam).view(batch, beams * beams)
    pick = torch.sort(-candidates, dim=1, stable=True).indices[:, :beams]
    expected_rows = (torch.arange(batch)[:, None] * beams + pick // beams).view(-1)
    expected_tokens = per_beam.view(batch, -1).gather(1, pick).view(-1, 1)
    expected_scores = candidates.gather(1, pick).view(-1)
    expected = sequences.index_select(0, expected_rows)
    expected[:, column] = expected_tokens.view(-1)
    expected[:, column + 1:] = sequences[:, column + 1:]  # past the column: as they were
    source, tokens = ops.beam_choose(logits, scores, beams, bias, sequences, column)
    assert torch.equal(source, expected_rows) and torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)
    assert torch.equal(sequences, expected)
    assert vocab // 2 not in tokens.flatten().tolist()


def test_beam_choose_refuses_bad_calls(ops):
    logits, scores, sequences = torch.randn(4, 100), torch.zeros(4), torch.zeros(4, 8, dtype=torch.long)
    with pytest.raises(RuntimeError, match="rows a multiple of beams"):
        ops.beam_choose(logits, scores, 3, None, sequences, 2)
    with pytest.raises(RuntimeError, match="scores must be contiguous float32 with one value per row"):
        ops.beam_choose(logits, torch.zeros(4, dtype=torch.float64), 4, None, sequences, 2)
    with pytest.raises(RuntimeError, match="more than 8 columns"):
        ops.beam_choose(logits, scores, 4, None, sequences, 8)
    with pytest.raises(RuntimeError, match="k must be 1 to 64, got 65"):
        ops.beam_choose(torch.randn(65, 100), torch.zeros(65), 65, None, torch.zeros(65, 8, dtype=torch.long), 2)
