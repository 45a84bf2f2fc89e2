"""The interpreter's memory checks (vitkern.testing.memcheck), which conftest turns on for every interpreter test:
they must flag loads and stores past a tensor argument and races between programs, and pass masked tails, strided
views, packed views that overlap and programs that share only reads."""

import pytest
import torch
import triton
import triton.language as tl

from vitkern.testing.memcheck import MemoryCheckError, check_memory

pytestmark = pytest.mark.interpreter


@triton.jit
def _copy_rows(x_ptr, y_ptr, n_rows, n_cols, stride_x, stride_y, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
               MASK_LOAD: tl.constexpr, MASK_STORE: tl.constexpr):
    # x, y: [n_rows, n_cols] with row strides stride_x / stride_y, unit column stride
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    src = x_ptr + rows[:, None] * stride_x + cols[None, :]
    dst = y_ptr + rows[:, None] * stride_y + cols[None, :]
    tile = tl.load(src, mask=ok, other=0.0) if MASK_LOAD else tl.load(src)
    if MASK_STORE:
        tl.store(dst, tile, mask=ok)
    else:
        tl.store(dst, tile)


def _copy(x, y, *, block_r=4, block_c=8, mask_load=True, mask_store=True):
    grid = (triton.cdiv(x.shape[0], block_r),)
    _copy_rows[grid](x, y, x.shape[0], x.shape[1], x.stride(0), y.stride(0), BLOCK_R=block_r, BLOCK_C=block_c,
                     MASK_LOAD=mask_load, MASK_STORE=mask_store)


def _raised(fn) -> str:
    """The MemoryCheckError message fn raised (the interpreter re-raises kernel errors as InterpreterError(repr(e)))."""
    with pytest.raises(Exception) as info:
        fn()
    msg = str(info.value)
    assert isinstance(info.value, MemoryCheckError) or "MemoryCheckError" in msg, msg
    return msg


def test_masked_tails_pass_and_copy():
    x, y = torch.randn(10, 5), torch.full((10, 5), float("nan"))  # 10 rows over blocks of 4; 5 cols over 8
    with check_memory():
        _copy(x, y)
    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_unmasked_load_past_the_end_is_named():
    x, y = torch.randn(10, 8), torch.empty(10, 8)  # cols fit; the last row block reads rows 10, 11
    with check_memory():
        msg = _raised(lambda: _copy(x, y, mask_load=False))
    assert "tl.load" in msg and "'x_ptr'" in msg and "past the end" in msg and "_copy_rows" in msg


def test_unmasked_store_past_the_end_is_named():
    x, y = torch.randn(10, 8), torch.empty(10, 8)
    with check_memory():
        msg = _raised(lambda: _copy(x, y, mask_store=False))
    assert "tl.store" in msg and "'y_ptr'" in msg


def test_a_view_ends_at_its_last_element_not_at_its_storage():
    # y is the first 5 columns of a [10, 9] buffer: storing 8 columns of the last row runs past the view's last
    # element into storage the view does not cover, which is out of bounds even though the storage holds it
    buf = torch.empty(10, 9)
    x, y = torch.randn(10, 8), buf[:, :5]
    with check_memory():
        _copy(x[:, :5], y)  # masked to 5 columns: in bounds
        msg = _raised(lambda: _copy(x, y, block_r=2, mask_store=False))
    assert "'y_ptr'" in msg


def test_overlapping_views_of_one_buffer_are_each_a_valid_extent():
    # a packed [rows, 3, 4] buffer seen as its q / k / v slices (how attention reads the qkv linear's output): k's
    # first address lies inside q's extent (q's rows end after k's first row starts) but k's last does not, so the
    # store into k must be matched against k's own extent, not the first argument holding its first address
    qkv = torch.randn(6, 3, 4)
    q, k, _ = qkv.unbind(1)
    q_before = q.clone()
    with check_memory():
        _copy_rows[(2,)](q, k, 6, 4, q.stride(0), k.stride(0), BLOCK_R=4, BLOCK_C=4, MASK_LOAD=True,
                         MASK_STORE=True)
    torch.testing.assert_close(k, q_before, rtol=0, atol=0)


def test_leaving_a_nested_check_keeps_the_outer_one():
    x, y = torch.randn(10, 8), torch.empty(10, 8)
    with check_memory():
        with check_memory():
            pass
        _raised(lambda: _copy(x, y, mask_load=False))


@triton.jit
def _row_sums(x_ptr, y_ptr, n_cols, stride_x, OUT_ROW: tl.constexpr, BLOCK_C: tl.constexpr):
    # y[OUT_ROW(row)] = sum of x's row: OUT_ROW 0 stores to the own row, 1 every program to row 0 (a race)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    total = tl.sum(tl.load(x_ptr + row * stride_x + cols, mask=cols < n_cols, other=0.0), axis=0)
    tl.store(y_ptr + (row if OUT_ROW == 0 else 0), total)


@triton.jit
def _shift_left(x_ptr, n, BLOCK: tl.constexpr):
    # in place x[i] = x[i + 1]: a block's last element reads the next block's first, which that program stores
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    nxt = tl.load(x_ptr + offs + 1, mask=offs + 1 < n)
    tl.store(x_ptr + offs, nxt, mask=offs + 1 < n)


def test_programs_sharing_reads_and_owning_their_stores_pass():
    x, y = torch.randn(5, 7), torch.full((5,), float("nan"))
    with check_memory():
        _row_sums[(5,)](x, y, 7, x.stride(0), OUT_ROW=0, BLOCK_C=8)
    torch.testing.assert_close(y, x.sum(1))


def test_two_programs_storing_one_address_is_a_race():
    x, y = torch.randn(5, 7), torch.empty(5)
    with check_memory():
        msg = _raised(lambda: _row_sums[(5,)](x, y, 7, x.stride(0), OUT_ROW=1, BLOCK_C=8))
    assert "race" in msg and "both store 'y_ptr' + 0 bytes" in msg


def test_loading_what_another_program_stores_is_a_race():
    x = torch.randn(40)
    with check_memory():
        msg = _raised(lambda: _shift_left[(5,)](x, 40, BLOCK=8))
    assert "race" in msg and "loads 'x_ptr' + 32 bytes" in msg
