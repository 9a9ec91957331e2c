"""Prompt templates for `lqae fewshot`, shipped as package data (`lqae.prompts`). See README.md here."""
