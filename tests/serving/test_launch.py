"""Each server gets its own BentoML home for metrics, sharing the model store."""
from serving.launch import server_home


def test_servers_share_the_model_store_but_not_the_metrics_folder(tmp_path):
    (tmp_path / "models" / "advmoe").mkdir(parents=True)
    first, second = server_home(3001, tmp_path), server_home(3002, tmp_path)
    assert first != second
    for home in (first, second):
        assert (home / "models" / "advmoe").is_dir() and (home / "bentos").is_dir()
        assert not (home / "prometheus_multiproc_dir").exists()  # BentoML makes it, per home
    assert server_home(3001, tmp_path) == first  # again: the same folder, links kept
