"""finance-qlora: QLoRA fine-tuning of LLMs on Finance-Alpaca, orchestrated with Prefect."""
