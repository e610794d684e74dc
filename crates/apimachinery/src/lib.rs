//! apimachinery: the pure parts of the Kubernetes API machinery.
//!
//! Status errors, label and field selectors, name and label validation, and the helpers the
//! server-side Table printer needs. No IO, no HTTP, no storage: everything here is a function
//! of its arguments and is tested table-driven next to the code. One client-side piece lives
//! here too, because every component needs it: `slim`, decoding objects without managedFields.

pub mod duration;
pub mod fields;
pub mod labels;
pub mod managed;
pub mod patch;
pub mod patch_meta;
pub mod quantity;
pub mod slim;
pub mod status;
pub mod strategic;
pub mod validation;

pub use status::{ApiError, Cause};
