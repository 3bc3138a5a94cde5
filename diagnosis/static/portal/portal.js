/* Lesion triage portal: progressive enhancement only. Every form also works without this script. */
(function () {
  "use strict";

  var FINAL = { done: true, failed: true };
  var ACCEPTED = ["image/jpeg", "image/png", "image/webp"];

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    if (text) node.textContent = text;
    return node;
  }

  function csrfToken(form) {
    var input = form.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  /* A key per file: if the same request reaches the server twice, it stores the photo once. */
  function newKey() {
    if (window.crypto && window.crypto.randomUUID) return window.crypto.randomUUID();
    return "k" + Date.now().toString(36) + Math.random().toString(36).slice(2);
  }

  function stateBadge(state, label) {
    return el("span", { "class": "state state-" + state }, label);
  }

  /* Follow a status URL until done(data) says so; onUpdate gets each answer that differs from the last.
     Each request is held by the server until something changes (?wait=25&since=VERSION), woken by the
     worker's notification: no polling on a timer. A server with no waiting slot free answers at once;
     then the next request comes after a pause. */
  var WAIT_SECONDS = 25;
  function poll(url, onUpdate, done) {
    var version = "", failures = 0;
    function next() {
      var started = Date.now();
      var query = (url.indexOf("?") < 0 ? "?" : "&") + "wait=" + WAIT_SECONDS + "&since=" + encodeURIComponent(version);
      fetch(url + query, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (response) {
          if (!response.ok) throw new Error("status " + response.status);
          return response.json();
        })
        .then(function (data) {
          failures = 0;
          var changed = data.version !== version;
          version = data.version;
          if (changed) onUpdate(data);
          if (done(data)) return;
          setTimeout(next, changed || Date.now() - started > 1000 ? 0 : 2000);
        })
        .catch(function () { failures += 1; setTimeout(next, Math.min(500 * Math.pow(2, failures), 10000)); });
    }
    next();
  }

  /* The result in one line, as the server words it: never a bare percentage ("Uncertain (49%): specialist
     review recommended", "Not assessable: take another photo"). */
  function describe(data) {
    if (data.state === "done") return data.summary || (data.percent + " · " + data.decision);
    if (data.state === "failed") return data.error || "The photo could not be scored.";
    return "";
  }

  function capitalised(text) {
    return text ? text.charAt(0).toUpperCase() + text.slice(1) : text;
  }

  /* "This photo was fine" on a photo the quality check refused: recorded without leaving the page. */
  function postPhotoFine(url, token) {
    return fetch(url, { method: "POST", credentials: "same-origin",
                        headers: { Accept: "application/json", "X-CSRFToken": token } })
      .then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok || !body.ok) throw new Error(body.error || "The request failed.");
          return body.message;
        });
      });
  }

  function confirmPhotoFine(url, token, control, button) {
    button.disabled = true;
    postPhotoFine(url, token).then(function (message) {
      var inTimeline = !!control.closest("#timeline");
      control.replaceWith(el("p", { "class": "confirmation", role: "status" }, message));
      if (!inTimeline) refreshTimeline(); // the timeline's copy of the photo says it was marked fine
    }).catch(function (error) {
      button.disabled = false;
      var note = el("p", { "class": "error", role: "alert" }, error.message || "The request failed; check your connection.");
      control.parentNode.appendChild(note);
    });
  }

  /* --- status badges already on the page (timeline rows, a result still being computed) ------ */
  function watchStatuses(root) {
    root.querySelectorAll("[data-status-url][data-state]").forEach(function (node) {
      if (FINAL[node.getAttribute("data-state")] || node.hasAttribute("data-watched")) return;
      if (node.id === "pictures" || node.id === "result") return;
      node.setAttribute("data-watched", "1");
      poll(node.getAttribute("data-status-url"), function (data) {
        node.setAttribute("data-state", data.state);
        node.textContent = "";
        node.appendChild(stateBadge(data.state, data.state_label));
        var text = describe(data);
        if (text) node.appendChild(el("span", { "class": data.state === "failed" ? "error" : "" }, " " + text));
      }, function (data) {
        if (!data.final) return false;
        if (node.hasAttribute("data-reload-when-done")) window.location.reload();
        else refreshTimeline();
        return true;
      });
    });
  }

  /* --- the lesion timeline, refreshed when an upload finishes ---------------------------------- */
  var timelineTimer = null;
  function refreshTimeline() {
    var form = document.getElementById("upload-form");
    var timeline = document.getElementById("timeline");
    if (!form || !timeline) return;
    clearTimeout(timelineTimer);
    timelineTimer = setTimeout(function () {
      fetch(form.getAttribute("data-timeline-url"), { credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.text() : Promise.reject(); })
        .then(function (html) { timeline.innerHTML = html; watchStatuses(timeline); })
        .catch(function () {});
    }, 300);
  }

  /* --- drag-and-drop upload with previews, per-file progress and live states ------------------ */
  function setupUpload() {
    var form = document.getElementById("upload-form");
    if (!form || !window.FormData || !window.XMLHttpRequest) return;
    var input = document.getElementById("id_images");
    var zone = document.getElementById("dropzone");
    var list = document.getElementById("upload-list");
    var button = document.getElementById("upload-button");
    var maxBytes = parseInt(form.getAttribute("data-max-bytes"), 10) || 0;
    var pending = [];

    var camera = document.getElementById("id_camera");
    var retaking = null; // the refused upload that the photo being taken replaces

    function addFiles(files) {
      var added = [];
      Array.prototype.forEach.call(files, function (file) {
        var item = el("li", { "class": "upload-item" });
        var preview = el("img", { alt: "Preview of " + file.name });
        var details = el("div", { "class": "details" });
        var name = el("div", { "class": "name" }, file.name);
        var status = el("div", { "class": "status", role: "status" });
        details.appendChild(name);
        details.appendChild(status);
        item.appendChild(preview);
        item.appendChild(details);
        list.appendChild(item);
        var problem = null;
        if (ACCEPTED.indexOf(file.type) < 0) {
          problem = "This is not a JPEG, PNG or WebP photo" + (file.type ? " (" + file.type + ")" : "") + ".";
        } else if (maxBytes && file.size > maxBytes) {
          problem = "The file is " + (file.size / 1e6).toFixed(1) + " MB; the limit is " + Math.round(maxBytes / 1048576) + " MB.";
        }
        if (problem) {
          preview.remove();
          status.appendChild(el("span", { "class": "error" }, problem));
          item.classList.add("invalid");
          return;
        }
        preview.src = URL.createObjectURL(file);
        preview.onload = function () { URL.revokeObjectURL(preview.src); };
        preview.onerror = function () { preview.removeAttribute("src"); };
        status.textContent = "Ready to upload";
        var entry = { file: file, item: item, status: status, preview: preview, key: newKey() };
        pending.push(entry);
        added.push(entry);
      });
      button.disabled = pending.length === 0;
      button.textContent = pending.length > 1 ? "Upload " + pending.length + " photos" : "Upload";
      return added;
    }

    /* "Take another photo": the camera input (on a phone, the back camera; elsewhere a file chooser). The
       photo taken is uploaded at once: the camera has shown it already. */
    function takeAnotherPhoto(replaces) {
      retaking = replaces || null;
      var target = camera || input;
      target.focus();
      target.click();
    }

    /* A photo the quality check refused: its reasons in words and what to do next, where it was uploaded. */
    function showRefusal(entry, data) {
      if (entry.item.querySelector(".refused")) return;
      entry.item.classList.add("refused");
      var box = el("div", { "class": "refused" });
      if (data.reasons && data.reasons.length) {
        var reasons = el("ul", { "class": "reasons" });
        data.reasons.forEach(function (reason) { reasons.appendChild(el("li", {}, capitalised(reason))); });
        box.appendChild(reasons);
      }
      var actions = el("div", { "class": "retake-actions" });
      var again = el("button", { type: "button", "class": "primary" }, "Take another photo");
      again.addEventListener("click", function () { takeAnotherPhoto(entry); });
      actions.appendChild(again);
      if (data.photo_fine_url) {
        var fine = el("button", { type: "button" }, "This photo was fine");
        fine.addEventListener("click", function () { confirmPhotoFine(data.photo_fine_url, csrfToken(form), fine, fine); });
        actions.appendChild(fine);
      }
      box.appendChild(actions);
      entry.status.appendChild(box);
    }

    function send(batch) {
      button.disabled = true;
      button.textContent = "Uploading…";
      return batch.reduce(function (chain, entry) { return chain.then(function () { return uploadOne(entry); }); }, Promise.resolve())
        .then(function () {
          button.textContent = pending.length > 1 ? "Upload " + pending.length + " photos" : "Upload";
          button.disabled = pending.length === 0;
        });
    }

    function uploadOne(entry) {
      return new Promise(function (resolve) {
        var data = new FormData();
        data.append("images", entry.file, entry.file.name);
        var xhr = new XMLHttpRequest();
        var bar = el("progress", { max: "100", value: "0", "aria-label": "Upload progress for " + entry.file.name });
        entry.status.textContent = "";
        entry.status.appendChild(bar);
        xhr.upload.onprogress = function (event) {
          if (event.lengthComputable) bar.value = Math.round((event.loaded / event.total) * 100);
        };
        xhr.onload = function () {
          var body = null;
          try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
          var result = body && body.files && body.files[0];
          entry.status.textContent = "";
          if (!result || !result.ok) {
            var message = (result && result.error) || (body && body.error) || "The upload failed (HTTP " + xhr.status + ").";
            entry.status.appendChild(el("span", { "class": "error" }, message));
            entry.item.classList.add("invalid");
            resolve();
            return;
          }
          entry.item.setAttribute("data-image", result.id);
          var badge = el("span", { "class": "status-line", "data-state": result.state });
          badge.appendChild(stateBadge(result.state, result.state_label));
          entry.status.appendChild(badge);
          var link = el("a", { href: result.result_url }, "Open result");
          poll(result.status_url, function (update) {
            badge.setAttribute("data-state", update.state);
            badge.textContent = "";
            badge.appendChild(stateBadge(update.state, update.state_label));
            var text = describe(update);
            if (text) badge.appendChild(el("span", { "class": update.state === "failed" ? "error" : "" }, " " + text));
          }, function (update) {
            if (!update.final) return false;
            entry.status.appendChild(document.createTextNode(" "));
            entry.status.appendChild(link);
            if (update.decision_code === "not_assessable") showRefusal(entry, update);
            refreshTimeline();
            return true;
          });
          resolve();
        };
        xhr.onerror = function () {
          entry.status.textContent = "";
          entry.status.appendChild(el("span", { "class": "error" }, "The connection failed; the photo was not uploaded. Try again."));
          resolve();
        };
        xhr.open("POST", form.action);
        xhr.setRequestHeader("Accept", "application/json");
        xhr.setRequestHeader("X-CSRFToken", csrfToken(form));
        xhr.setRequestHeader("Idempotency-Key", entry.key);
        xhr.send(data);
      });
    }

    input.addEventListener("change", function () { addFiles(input.files); input.value = ""; });
    if (camera) {
      var cameraLabel = form.querySelector("label[for=id_camera]");
      if (cameraLabel) cameraLabel.addEventListener("click", function () { retaking = null; });
      camera.addEventListener("change", function () {
        var added = addFiles(camera.files);
        camera.value = "";
        if (!retaking) return;
        var replaced = retaking;
        retaking = null;
        if (!added.length) return;
        replaced.item.classList.add("replaced");
        var again = replaced.item.querySelector(".retake-actions button.primary");
        if (again) again.replaceWith(el("span", { "class": "small" }, "Replaced by the photo below."));
        pending = pending.filter(function (entry) { return added.indexOf(entry) < 0; });
        send(added);
      });
    }
    // A refused photo in the timeline: its "Take another photo" opens the camera too.
    document.addEventListener("click", function (event) {
      var link = event.target.closest && event.target.closest("[data-retake]");
      if (!link) return;
      event.preventDefault();
      document.getElementById("add-photos").scrollIntoView({ block: "start" });
      takeAnotherPhoto(null);
    });
    // Sent here by a refused photo's result page: the camera is one key (or tap) away. Focused once the page
    // has loaded: the browser's move to #add-photos would otherwise take the focus back to the page.
    if (/[?&]retake=/.test(window.location.search) && camera) {
      var focusCamera = function () { setTimeout(function () { camera.focus({ preventScroll: true }); }, 0); };
      if (document.readyState === "complete") focusCamera();
      else window.addEventListener("load", focusCamera);
    }
    ["dragenter", "dragover"].forEach(function (name) {
      zone.addEventListener(name, function (event) { event.preventDefault(); zone.classList.add("dragover"); });
    });
    ["dragleave", "drop"].forEach(function (name) {
      zone.addEventListener(name, function (event) { event.preventDefault(); zone.classList.remove("dragover"); });
    });
    zone.addEventListener("drop", function (event) {
      if (event.dataTransfer && event.dataTransfer.files) addFiles(event.dataTransfer.files);
    });
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var batch = pending;
      pending = [];
      send(batch);
    });
    button.disabled = true;
  }

  /* --- result page: method switch, opacity slider, request another method ---------------------- */
  function setupResult() {
    var pictures = document.getElementById("pictures");
    var layer = document.getElementById("heatmap-layer");
    if (!pictures || !layer) return;
    var slider = document.getElementById("opacity");
    var output = document.getElementById("opacity-value");
    var caption = document.getElementById("heatmap-caption");
    var methods = document.getElementById("methods");

    function show(radio) {
      layer.src = radio.getAttribute("data-heatmap-url");
      layer.hidden = false;
      var label = radio.parentNode.querySelector(".method-label").textContent;
      layer.alt = "Heatmap of " + label + " over the photo";
      caption.textContent = label + ", explaining “" + radio.getAttribute("data-target") + "”: red pushed towards it, blue away from it. ";
      var link = document.getElementById("overlay-download") || el("a", { id: "overlay-download" }, "overlay with legend");
      link.href = radio.getAttribute("data-overlay-url");
      caption.parentNode.appendChild(link);
    }

    if (slider) {
      slider.addEventListener("input", function () {
        layer.style.opacity = slider.value / 100;
        output.textContent = slider.value + "%";
      });
    }
    methods.addEventListener("change", function (event) {
      if (event.target.name === "method" && event.target.checked) show(event.target);
    });

    var emptyPolls = 0;
    function watchExplanations() {
      if (pictures.hasAttribute("data-watching")) return;
      pictures.setAttribute("data-watching", "1");
      poll(pictures.getAttribute("data-status-url"), function (data) {
        (data.explanations || []).forEach(function (explanation) {
          var radio = document.getElementById("method-" + explanation.id);
          if (!radio) {
            var label = el("label", { "class": "choice", "for": "method-" + explanation.id });
            radio = el("input", { type: "radio", name: "method", id: "method-" + explanation.id, value: explanation.method,
                                  "data-target": explanation.target_class, "data-explanation": explanation.id });
            label.appendChild(radio);
            label.appendChild(el("span", { "class": "method-label" }, " " + explanation.label));
            label.appendChild(el("span", { "class": "method-state" }, ""));
            methods.appendChild(label);
          }
          var state = radio.parentNode.querySelector(".method-state");
          if (explanation.state === "done") {
            var wasDisabled = radio.disabled || !radio.getAttribute("data-heatmap-url");
            radio.disabled = false;
            radio.setAttribute("data-heatmap-url", explanation.heatmap_url);
            radio.setAttribute("data-overlay-url", explanation.overlay_url);
            state.textContent = "";
            if (wasDisabled && (layer.hidden || radio.hasAttribute("data-requested"))) { radio.checked = true; show(radio); }
          } else {
            radio.disabled = true;
            state.textContent = explanation.state === "failed" ? " (failed: " + explanation.error + ")" : " (" + explanation.state + ")";
          }
        });
      }, function (data) {
        var explanations = data.explanations || [];
        var busy = explanations.some(function (e) { return !FINAL[e.state]; });
        // Just after a result the explanations may not be recorded yet: wait for a few more changes.
        if (!explanations.length && data.state === "done" && emptyPolls++ < 5) busy = true;
        if (!busy) pictures.removeAttribute("data-watching");
        return !busy;
      });
    }

    var requestForm = document.getElementById("request-method");
    if (requestForm) {
      requestForm.addEventListener("submit", function (event) {
        event.preventDefault();
        var error = document.getElementById("request-error");
        error.hidden = true;
        var select = requestForm.querySelector("select");
        fetch(requestForm.action, {
          method: "POST", credentials: "same-origin", body: new FormData(requestForm),
          headers: { Accept: "application/json", "X-CSRFToken": csrfToken(requestForm) },
        }).then(function (response) {
          return response.json().then(function (body) { return { ok: response.ok, body: body }; });
        }).then(function (answer) {
          if (!answer.ok) { error.textContent = answer.body.error || "The request failed."; error.hidden = false; return; }
          var option = select.querySelector("option[value='" + answer.body.method + "']");
          if (option) option.remove();
          if (!select.options.length) requestForm.hidden = true;
          var label = el("label", { "class": "choice", "for": "method-" + answer.body.id });
          var radio = el("input", { type: "radio", name: "method", id: "method-" + answer.body.id, value: answer.body.method,
                                    "data-target": answer.body.target_class, "data-requested": "1", disabled: "" });
          label.appendChild(radio);
          label.appendChild(el("span", { "class": "method-label" }, " " + answer.body.label));
          label.appendChild(el("span", { "class": "method-state" }, " (" + answer.body.state + ")"));
          methods.appendChild(label);
          watchExplanations();
        }).catch(function () { error.textContent = "The request failed; check your connection."; error.hidden = false; });
      });
    }
    var anyPending = methods.querySelector("input:disabled") || layer.hidden;
    if (anyPending) watchExplanations();
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupUpload();
    setupResult();
    watchStatuses(document);
    document.querySelectorAll("[data-print]").forEach(function (button) {
      button.addEventListener("click", function () { window.print(); });
    });
    // "This photo was fine" in the timeline: recorded in place (without script the form posts as usual).
    document.addEventListener("submit", function (event) {
      var form = event.target;
      if (!form.hasAttribute || !form.hasAttribute("data-photo-fine")) return;
      event.preventDefault();
      var submit = form.querySelector("button");
      if (submit && !submit.disabled) confirmPhotoFine(form.action, csrfToken(form), form, submit);
    });
    document.querySelectorAll("[data-select-on-focus]").forEach(function (input) {
      input.addEventListener("focus", function () { input.select(); });
    });
  });
})();
