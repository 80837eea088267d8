import pytest

from kvlab import ConfigError
from kvlab.eval.bench import measure_decode

from conftest import make_model


def test_measure_decode_counts_what_a_step_reads():
    model = make_model(n_kv_head=1, cla=2)
    r = measure_decode(model, batch_size=3, context=50, steps=3, warmup=1)
    # 2 producer layers x K and V x 1 head x 16 dims x 4 bytes, for 51 tokens in 3 rows.
    assert r.kv_bytes_per_step == 2 * 2 * 1 * 16 * 4 * 3 * 51
    assert r.step_ms > 0 and r.tokens_per_s == pytest.approx(3 / (r.step_ms / 1e3))
    assert r.kv_read_GBps == pytest.approx(r.kv_bytes_per_step / (r.step_ms / 1e3) / 1e9)


def test_measure_decode_errors():
    with pytest.raises(ConfigError, match="context=0"):
        measure_decode(make_model(), 1, 0)
    with pytest.raises(ConfigError, match="steps=0"):
        measure_decode(make_model(), 1, 4, steps=0)
