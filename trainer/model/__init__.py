"""The model: the LLM with LoRA and the hybrid embedding (build, hybrid_embedding, export), the base folders
it reads (folder, stock, tiny, smollm2), the injection kernels (kernels/) and the frozen SRec (srec/)."""
