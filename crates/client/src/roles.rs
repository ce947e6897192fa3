//! The end user's role as UserService stores it now, for privileged decisions in other
//! services: an access token's `role` claim may be minutes old, and a demoted or deleted
//! moderator must be refused at once.

use tessera::users::v1::{GetUserRequest, Role, user_service_client::UserServiceClient};
use tonic::{Code, Status};

use crate::Channel;

/// Whether `user_id` is a MODERATOR or ADMIN right now, asked of UserService.GetUser (the
/// call carries the caller's deadline, token and trace like any other). A user that no
/// longer exists is not. Any other failure is UNAVAILABLE: the decision cannot be made, so
/// nothing privileged happens.
pub async fn is_moderator_now(
    users: &UserServiceClient<Channel>,
    user_id: &str,
) -> Result<bool, Status> {
    let request = GetUserRequest {
        user_id: user_id.to_owned(),
    };
    match users.clone().get_user(request).await {
        Ok(response) => Ok(response
            .into_inner()
            .user
            .is_some_and(|u| matches!(Role::try_from(u.role), Ok(Role::Moderator | Role::Admin)))),
        Err(status) if status.code() == Code::NotFound => Ok(false),
        Err(status) => Err(Status::unavailable(format!(
            "cannot confirm the caller's current role: {}: {}",
            status.code(),
            status.message()
        ))),
    }
}
