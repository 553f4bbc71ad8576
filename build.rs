//! Compiles `src/proto/**/*.proto` in pure Rust (protox, no system `protoc`) into
//! prost message types, pbjson serde impls (the canonical proto3 JSON mapping) and,
//! per service, a table of its method names used to build and check the HTTP routes.

use std::{env, fmt::Write as _, fs, path::PathBuf};

const PROTO_ROOT: &str = "src/proto";
const PROTOS: &[&str] = &[
    "roomcast/v1/common.proto",
    "roomcast/v1/auth.proto",
    "roomcast/v1/users.proto",
    "roomcast/v1/rooms.proto",
    "roomcast/v1/notifications.proto",
    "roomcast/v1/publish.proto",
    "roomcast/v1/push.proto",
    "roomcast/v1/realtime.proto",
    "roomcast/v1/admin.proto",
    // node to node (the cluster broker), never seen by clients
    "roomcast/node/v1/node.proto",
];

/// Emits `pub mod <service_snake> { NAME, METHODS }` for each service.
struct MethodTable;

impl prost_build::ServiceGenerator for MethodTable {
    fn generate(&mut self, service: prost_build::Service, buf: &mut String) {
        let module = to_snake(&service.name);
        let full = format!("{}.{}", service.package, service.proto_name);
        let _ = writeln!(buf, "/// Method names of `{full}`.");
        let _ = writeln!(buf, "pub mod {module} {{");
        let _ = writeln!(buf, "    /// Fully qualified service name.");
        let _ = writeln!(buf, "    pub const NAME: &str = \"{full}\";");
        let _ = writeln!(
            buf,
            "    /// Unary methods, served as `POST /{full}/<Method>`."
        );
        let _ = write!(buf, "    pub const UNARY_METHODS: &[&str] = &[");
        for m in service
            .methods
            .iter()
            .filter(|m| !m.client_streaming && !m.server_streaming)
        {
            let _ = write!(buf, "\"{}\", ", m.proto_name);
        }
        let _ = writeln!(buf, "];");
        let _ = writeln!(buf, "}}");
    }
}

fn to_snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let files = protox::compile(PROTOS, [PROTO_ROOT])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_bytes = prost::Message::encode_to_vec(&files);
    fs::write(out.join("roomcast_descriptor.bin"), &descriptor_bytes)?;

    prost_build::Config::new()
        .compile_well_known_types()
        // Our own Timestamp: pbjson_types writes `+00:00`, which connect-es refuses.
        .extern_path(".google.protobuf.Timestamp", "crate::proto::Timestamp")
        .extern_path(".google.protobuf", "::pbjson_types")
        .service_generator(Box::new(MethodTable))
        .compile_fds(files)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .ignore_unknown_fields()
        .build(&[".roomcast"])?;
    Ok(())
}
