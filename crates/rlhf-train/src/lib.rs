//! rlhf-train (in progress)
