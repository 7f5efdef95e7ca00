//! The CI side: the tags of a build from its git context, and server-side promotion.

pub mod promote;
pub mod tags;
