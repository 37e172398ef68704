"""Any Hugging Face encoder with a sequence-classification head: tiny random BERT, RoBERTa, DistilBERT, ELECTRA and
DeBERTa-v2 models (the packaged tokenizer, 2 layers, hidden 16) through training and an ekfac analysis."""

import numpy as np
import pytest
import torch

import glue_attribution as ga
from glue_attribution import pipeline

SMALL = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
         "max_position_embeddings": 66}
ARCHITECTURES = {
    "bert": ("BertConfig", SMALL),
    "roberta": ("RobertaConfig", SMALL),
    "distilbert": ("DistilBertConfig", {"dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32,
                                        "max_position_embeddings": 66}),
    "electra": ("ElectraConfig", {**SMALL, "embedding_size": 16}),
    "deberta-v2": ("DebertaV2Config", {**SMALL, "relative_attention": True, "pos_att_type": ["p2c", "c2p"]}),
}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_train_and_analyze_any_encoder(architecture, tmp_path, glue_dir):
    import transformers

    tokenizer = pipeline.load_tokenizer(pipeline.PACKAGED_MODEL)
    if architecture == "distilbert":  # no segment embeddings: its tokenizers give no token_type_ids
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    name, sizes = ARCHITECTURES[architecture]
    config = getattr(transformers, name)(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, **sizes)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")

    data = {"dataset_name": "rte", "data_dir": str(glue_dir), "max_train_samples": 16, "max_seq_length": 32,
            "device": "cpu"}
    ga.train(ga.TrainRunConfig(**data, model_name_or_path=str(tmp_path / "model"), num_train_epochs=1,
                               train_batch_size=8, learning_rate=1e-3, seed=0, checkpoint_dir=str(tmp_path / "ckpt")))
    scores = ga.analyze(ga.configure(ga.AnalysisConfig, str(tmp_path / "ckpt"), "rte", output_dir=str(tmp_path / "out"),
                                     max_query_examples=4, query_batch_size=4, train_batch_size=8, device="cpu"))
    assert scores.scores.shape == (4, 16) and np.isfinite(scores.scores).all() and np.abs(scores.scores).sum() > 0
    assert scores.meta["checkpoint_metrics"]["eval_samples"] == 16
