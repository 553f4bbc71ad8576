//! The `roomcast` binary: parse the command line, load settings, start logging,
//! then serve, migrate, check the configuration or manage users.

use std::{
    io::{IsTerminal as _, Read as _},
    path::PathBuf,
    process::ExitCode,
};

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
    /// Create an account. Without --password, the password is asked for on the
    /// terminal (twice, not echoed), or read from standard input when that is not
    /// a terminal (`echo "$PW" | roomcast user create --username bob`).
    Create {
        #[arg(long)]
        username: String,
        /// Read the password from standard input (the whole input, without its
        /// final newline), even when it is a terminal.
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
            let password = match read_password(&username, password, password_stdin) {
                Ok(password) => password,
                Err(message) => {
                    eprintln!("roomcast: {message}");
                    return ExitCode::from(2);
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

/// The password of `user create`: the `--password` argument; else a prompt on
/// the terminal without echo (asked twice); else standard input. A terminal user
/// is never left waiting at a silent cursor.
fn read_password(
    username: &str,
    given: Option<String>,
    from_stdin: bool,
) -> Result<String, String> {
    if let Some(password) = given {
        return Ok(password);
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() && !from_stdin {
        let first = rpassword::prompt_password(format!("Password for {username}: "))
            .map_err(|e| format!("cannot read the password from the terminal: {e}"))?;
        let again = rpassword::prompt_password("Repeat the password: ")
            .map_err(|e| format!("cannot read the password from the terminal: {e}"))?;
        if first != again {
            return Err("the passwords differ; nothing was created".into());
        }
        return Ok(first);
    }
    if stdin.is_terminal() {
        eprintln!("Reading the password from standard input (end it with Ctrl-D):");
    }
    let mut buf = String::new();
    stdin
        .lock()
        .read_to_string(&mut buf)
        .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
    Ok(buf.trim_end_matches(['\n', '\r']).to_owned())
}

/// Runs a future in a fresh actix system.
fn run<E: std::fmt::Display>(
    future: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    actix_web::rt::System::new()
        .block_on(future)
        .map_err(|e| e.to_string())
}
