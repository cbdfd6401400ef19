import logging
from pathlib import Path

import pytest

from flowstep_export.model.configs import get_config
from flowstep_export.pipeline.export import ExportOptions, export_artifacts
from flowstep_export.model.lora import LoraConfig
from wan_fixtures import write_text_encoder, write_tokenizer, write_vae, write_vae22

TINY_LORA = LoraConfig(rank=8)


@pytest.fixture(scope="session")
def tiny_options(tmp_path_factory) -> ExportOptions:
    # Attention chunk 12, as in models/tiny: the test latents span one to seven chunks, padding included.
    return ExportOptions(out=tmp_path_factory.mktemp("tiny"), lora=TINY_LORA, ship_base=True, seed=0, attention_chunk=12)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_options) -> Path:
    logging.getLogger("flowstep_export").setLevel(logging.ERROR)
    export_artifacts(get_config("tiny"), tiny_options)
    return tiny_options.out


@pytest.fixture(scope="session")
def alpha_run(tmp_path_factory):
    """lora_run.train_alpha_run, once for every LoRA file test."""
    from lora_run import train_alpha_run

    return train_alpha_run(tmp_path_factory.mktemp("alpha"))


@pytest.fixture(scope="session")
def vae_decoder(tmp_path_factory) -> Path:
    """A random tiny Wan VAE (`wan_2.1_vae.safetensors`, ComfyUI's layout with the original key
    names) and its decoder exported to `decoder/`: shared, the export takes ~45 s."""
    from flowstep_export.pipeline.vae_decoder import main as export_main
    from wan_fixtures import write_vae

    d = tmp_path_factory.mktemp("vae")
    write_vae(d / "wan_2.1_vae.safetensors", seed=1)
    assert export_main(["--vae", str(d / "wan_2.1_vae.safetensors"), "--out", str(d / "decoder")]) == 0
    return d


@pytest.fixture(scope="session")
def vae22_decoder(tmp_path_factory) -> Path:
    """A random tiny Wan2.2 VAE (`Wan2.2_VAE.pth`) and its decoder exported to `decoder/`:
    shared by test_vae_decoder and test_videos_end_to_end, the export takes minutes."""
    from flowstep_export.pipeline.vae_decoder import main as export_main

    d = tmp_path_factory.mktemp("vae22")
    write_vae22(d / "Wan2.2_VAE.pth", seed=2)
    assert export_main(["--vae", str(d / "Wan2.2_VAE.pth"), "--out", str(d / "decoder")]) == 0
    return d


@pytest.fixture(scope="session")
def tiny_i2v(tmp_path_factory) -> Path:
    """tiny-i2v is not committed (DiffSynth's img_emb is 1280 wide: 7 MB of base weights)."""
    logging.getLogger("flowstep_export").setLevel(logging.ERROR)
    options = ExportOptions(out=tmp_path_factory.mktemp("tiny-i2v"), lora=LoraConfig(rank=8), ship_base=True,
                            attention_chunk=12, graphs=("training_model", "inference_model", "optimizer_model", "eval_model"))
    export_artifacts(get_config("tiny-i2v"), options)
    return options.out


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Random tiny Wan2.1 and Wan2.2 VAEs, umT5 and tokenizer files, as a user's checkpoints
    (test_prepare, test_hostile_tools)."""
    d = tmp_path_factory.mktemp("encoders")
    vocab = write_tokenizer(d / "tokenizer")
    write_vae(d / "vae.pth")
    write_vae22(d / "Wan2.2_VAE.pth")
    write_text_encoder(d / "t5.pth", vocab)
    return d
