//! rlhf-data (in progress)
