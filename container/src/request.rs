//! Image config + command line → the run request the agent gets, with docker's rules: a
//! given command replaces Cmd and keeps Entrypoint; `-e` overrides the image's Env; `-w`
//! overrides WorkingDir.

use rvmm_agent::protocol::{RunRequest, Volume};

use super::image::Settings;

/// Used when neither the image nor `-e` sets PATH.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("-e {0:?}: expected KEY=VALUE")]
    BadEnv(String),
    #[error("-w {0:?}: the working directory must be absolute")]
    RelativeWorkdir(String),
    #[error("no command: the image has no Entrypoint or Cmd; give one after --")]
    NoCommand,
}

/// The command-line side of a run.
#[derive(Debug, Default)]
pub struct Overrides<'a> {
    pub command: &'a [String],
    pub env: &'a [String],
    pub workdir: Option<&'a str>,
    pub stdin: bool,
    pub host_network: bool,
    pub volumes: &'a [Volume],
}

/// Adds KEY=VALUE entries to `env`, replacing an existing KEY in place.
fn merge_env(env: &mut Vec<String>, entries: &[String]) {
    for entry in entries {
        let key = entry.split('=').next().unwrap_or_default();
        match env.iter_mut().find(|e| e.split('=').next() == Some(key)) {
            Some(old) => old.clone_from(entry),
            None => env.push(entry.clone()),
        }
    }
}

pub fn run_request(image: &Settings, o: &Overrides) -> Result<RunRequest, RequestError> {
    if let Some(bad) = o
        .env
        .iter()
        .find(|e| !e.contains('=') || e.starts_with('='))
    {
        return Err(RequestError::BadEnv(bad.clone()));
    }
    let mut argv = image.entrypoint.clone();
    argv.extend_from_slice(if o.command.is_empty() {
        &image.cmd
    } else {
        o.command
    });
    if argv.is_empty() {
        return Err(RequestError::NoCommand);
    }
    let mut env = Vec::new();
    merge_env(&mut env, &image.env);
    merge_env(&mut env, o.env);
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.into());
    }
    let cwd = match o.workdir {
        Some(dir) if !dir.starts_with('/') => {
            return Err(RequestError::RelativeWorkdir(dir.into()))
        }
        Some(dir) => dir.to_string(),
        None if image.working_dir.is_empty() => "/".into(),
        None => image.working_dir.clone(),
    };
    Ok(RunRequest {
        argv,
        env,
        cwd,
        user: image.user.clone(),
        stdin: o.stdin,
        host_network: o.host_network,
        volumes: o.volumes.to_vec(),
        ..RunRequest::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn image() -> Settings {
        Settings {
            env: strings(&["PATH=/bin", "A=1", "B=2"]),
            entrypoint: strings(&["/entry"]),
            cmd: strings(&["--default"]),
            working_dir: "/app".into(),
            user: "app".into(),
        }
    }

    #[test]
    fn image_defaults_apply_without_overrides() {
        let req = run_request(&image(), &Overrides::default()).unwrap();
        assert_eq!(req.argv, ["/entry", "--default"]);
        assert_eq!(req.env, ["PATH=/bin", "A=1", "B=2"]);
        assert_eq!(req.cwd, "/app");
        assert_eq!(req.user, "app");
        assert!(!req.stdin && !req.host_network);
    }

    #[test]
    fn overrides_replace_cmd_env_and_workdir() {
        let command = strings(&["echo", "hi"]);
        let env = strings(&["B=3", "C=x=y", "A="]);
        let req = run_request(
            &image(),
            &Overrides {
                command: &command,
                env: &env,
                workdir: Some("/tmp"),
                stdin: true,
                host_network: true,
                volumes: &[],
            },
        )
        .unwrap();
        assert_eq!(req.argv, ["/entry", "echo", "hi"]);
        assert_eq!(req.env, ["PATH=/bin", "A=", "B=3", "C=x=y"]);
        assert_eq!(req.cwd, "/tmp");
        assert!(req.stdin && req.host_network);
    }

    #[test]
    fn empty_image_gets_a_path_and_root_dir() {
        let command = strings(&["sh"]);
        let o = Overrides {
            command: &command,
            ..Overrides::default()
        };
        let req = run_request(&Settings::default(), &o).unwrap();
        assert_eq!(req.env, [DEFAULT_PATH]);
        assert_eq!(req.cwd, "/");
        assert_eq!(req.user, "");
    }

    #[test]
    fn refuses_bad_input() {
        let none = Settings::default();
        assert_eq!(
            run_request(&none, &Overrides::default()),
            Err(RequestError::NoCommand)
        );
        for bad in ["NOEQUALS", "=value"] {
            let env = strings(&[bad]);
            let o = Overrides {
                env: &env,
                ..Overrides::default()
            };
            assert_eq!(
                run_request(&image(), &o),
                Err(RequestError::BadEnv(bad.into()))
            );
        }
        let o = Overrides {
            workdir: Some("rel"),
            ..Overrides::default()
        };
        assert_eq!(
            run_request(&image(), &o),
            Err(RequestError::RelativeWorkdir("rel".into()))
        );
    }
}
