// The dataset upload page: sends the form to the API with XMLHttpRequest, whose upload
// events (unlike fetch's) report progress, then opens the new dataset's images.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  const button = document.getElementById("upload-button");
  const progress = document.getElementById("upload-progress");
  const bar = progress.querySelector("span");
  const statusLine = document.getElementById("upload-status");
  const errorBox = document.getElementById("upload-error");

  function showError(answer) {
    let message = "The upload failed; try again.";
    if (answer && typeof answer === "object") {
      if (answer.detail) {
        message = answer.detail;
      } else {
        message = Object.entries(answer)
          .map(([field, problems]) => field + ": " + [].concat(problems).join(" "))
          .join("; ");
      }
    }
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function megabytes(bytes) {
    return (bytes / (1024 * 1024)).toFixed(1) + " MB";
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    errorBox.hidden = true;
    button.disabled = true;
    progress.hidden = false;
    bar.style.width = "0%";
    const request = new XMLHttpRequest();
    request.open("POST", form.dataset.uploadUrl);
    request.setRequestHeader("X-CSRFToken", form.elements.csrfmiddlewaretoken.value);
    request.setRequestHeader("Accept", "application/json");
    request.upload.addEventListener("progress", function (progressEvent) {
      if (progressEvent.lengthComputable) {
        bar.style.width = Math.round((100 * progressEvent.loaded) / progressEvent.total) + "%";
        statusLine.textContent =
          megabytes(progressEvent.loaded) + " of " + megabytes(progressEvent.total);
      }
    });
    request.upload.addEventListener("load", function () {
      statusLine.textContent = "Uploaded; checking and unpacking the images…";
    });
    request.addEventListener("load", function () {
      let answer = null;
      try {
        answer = JSON.parse(request.responseText);
      } catch (notJson) {
        answer = null;
      }
      if (request.status === 201 && answer) {
        statusLine.textContent = "Registered " + answer.name + ".";
        window.location.assign("/datasets/" + answer.id + "/viewer/");
        return;
      }
      button.disabled = false;
      progress.hidden = true;
      statusLine.textContent = "";
      showError(answer);
    });
    request.addEventListener("error", function () {
      button.disabled = false;
      progress.hidden = true;
      statusLine.textContent = "";
      showError(null);
    });
    const data = new FormData(form);
    data.delete("csrfmiddlewaretoken");
    request.send(data);
  });
})();
