"""Knowledge distillation from a frozen teacher."""
