//! rlhf-feedback (in progress)
