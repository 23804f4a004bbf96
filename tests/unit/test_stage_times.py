"""clusterucb-stage-times: per-stage totals from Snakemake benchmark files, other TSVs under the root ignored."""

from clusterucb.infra.stage_times import read_benchmarks, stage_table, to_markdown

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def test_stages_sum_their_jobs_and_skip_tsvs_that_are_not_benchmarks(tmp_path):
    (tmp_path / "grads_pool_shard" / "warmup").mkdir(parents=True)
    (tmp_path / "grads_pool_shard" / "warmup" / "0.tsv").write_text(HEADER + "10.5\t0:00:10\t1000\t0\t0\t0\t0\t0\t0\t0\n")
    (tmp_path / "grads_pool_shard" / "warmup" / "1.tsv").write_text(HEADER + "20.0\t0:00:20\t1500\t0\t0\t0\t0\t0\t0\t0\n")
    (tmp_path / "kmeans.tsv").write_text(HEADER + "2.0\t0:00:02\tNA\t0\t0\t0\t0\t0\t0\t0\n")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "table.tsv").write_text("task\tscore\ngsm8k\t0.5\n")

    rows = read_benchmarks(tmp_path)
    assert sorted(r["job"] for r in rows) == ["grads_pool_shard/warmup/0", "grads_pool_shard/warmup/1", "kmeans"]
    table = stage_table(rows)
    assert [s["stage"] for s in table] == ["grads_pool_shard", "kmeans"]
    assert table[0]["jobs"] == 2 and table[0]["total_s"] == 30.5 and table[0]["longest_s"] == 20.0
    assert table[0]["max_rss_mb"] == 1500.0 and table[1]["max_rss_mb"] == 0.0
    assert "| **all** | 3 | 32.5 | | |" in to_markdown(table)
