//! The agent: sources → model → reconciler → datapath (to be written).
