"""MEND: meta-trained editor networks that turn a fine-tuning gradient into a factual edit."""
