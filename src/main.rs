//! The `roomcast` binary: parse the command line, load settings, start logging,
//! then serve, migrate, check the configuration or manage users.

use std::{io::Read as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use roomcast::{app, settings::Settings, telemetry};

/// Self-hosted real-time messaging server.
#[derive(Parser)]
#[command(name = "roomcast", version, about)]
struct Cli {
    /// Configuration file (TOML); see config/default.toml for every key.
    #[arg(long, global = true, env = "ROOMCAST_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// User administration.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate the configuration, print the effective values (secrets masked).
    Check,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account.
    Create {
        #[arg(long)]
        username: String,
        /// Read the password from standard input instead of the prompt-less default.
        #[arg(long)]
        password_stdin: bool,
        /// The password (prefer --password-stdin: arguments show up in `ps`).
        #[arg(long, conflicts_with = "password_stdin")]
        password: Option<String>,
        #[arg(long)]
        display_name: Option<String>,
        /// Give the account the admin role.
        #[arg(long)]
        admin: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("roomcast: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.log);
    let outcome = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => run(app::serve(settings)),
        Command::Migrate => run(async move {
            let store = roomcast::store::Store::connect(&settings.store).await?;
            store.migrate().await?;
            store.close().await;
            println!("migrations applied");
            Ok::<_, roomcast::store::StoreError>(())
        }),
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            print!("{}", settings.to_masked_toml());
            Ok(())
        }
        Command::User {
            command:
                UserCommand::Create {
                    username,
                    password_stdin,
                    password,
                    display_name,
                    admin,
                },
        } => {
            let password = match (password, password_stdin) {
                (Some(p), _) => p,
                (None, _) => {
                    let mut buf = String::new();
                    if let Err(e) = std::io::stdin().read_to_string(&mut buf) {
                        eprintln!("roomcast: cannot read the password from standard input: {e}");
                        return ExitCode::from(2);
                    }
                    buf.trim_end_matches(['\n', '\r']).to_owned()
                }
            };
            run(roomcast::app::create_user(
                settings,
                username,
                password,
                display_name,
                admin,
            ))
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("roomcast: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a future in a fresh actix system.
fn run<E: std::fmt::Display>(
    future: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    actix_web::rt::System::new()
        .block_on(future)
        .map_err(|e| e.to_string())
}
